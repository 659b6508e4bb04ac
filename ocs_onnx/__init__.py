"""ocs-onnx: post-training quantization of ONNX models with Outlier Channel Splitting."""

__version__ = "0.1.0"

from .compiler import compile, compile_file  # noqa: E402
from .config import CompileConfig  # noqa: E402
from .errors import OcsError  # noqa: E402

__all__ = ["compile", "compile_file", "CompileConfig", "OcsError", "__version__"]

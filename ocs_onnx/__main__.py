"""python -m ocs_onnx: the same as the ocs-onnx command."""

from .cli import entry_point

entry_point()

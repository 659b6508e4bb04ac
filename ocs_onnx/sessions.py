"""onnxruntime sessions, all built here: the options every session of ocs-onnx shares (no log
lines on stderr, CPU provider), the input model's session, and the error messages."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import owned
from .errors import InvalidModelError, UnsupportedModelError, first_line
from .gs_adapter import graph_bytes, graph_skeleton, graph_to_model
from .loading import ModelSource
from .writing import model_files

# How much onnxruntime may rewrite the model before running it.
NO_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
BASIC_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
FULL_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def new_session(
    model: bytes | str,
    optimization: ort.GraphOptimizationLevel = FULL_OPTIMIZATION,
    config: dict[str, str] | None = None,
    optimized_model_path: str | None = None,
    memory_arena: bool = True,
) -> ort.InferenceSession:
    """A CPU session on a model (its bytes or its path). Errors are raised, never printed.
    ``memory_arena=False``: onnxruntime frees each run's buffers instead of keeping them for
    the next run (for sessions that fetch many intermediate tensors: calibration's)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = optimization
    options.enable_cpu_mem_arena = memory_arena
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")


def onnxruntime_message(exc: BaseException) -> str:
    """The first line of an onnxruntime error without its status-code prefix."""
    return _ORT_PREFIX.sub("", first_line(exc))


def input_session(source: ModelSource):
    """An onnxruntime session on the input model, unoptimized, and what to feed it besides the
    model's inputs: its large weights are graph inputs fed from the arrays (see graph_skeleton),
    which onnxruntime reads in place instead of copying the model's weights."""
    model, left_out = graph_skeleton(source.graph())
    # Loading checks types, shapes and ops; optimizing would only cost time here.
    return new_session(model.SerializeToString(), NO_OPTIMIZATION), left_out


def check_onnxruntime_loads(source: ModelSource, abits: int | None) -> None:
    """Fails early, with the reason, when onnxruntime cannot load the float model: it would have
    to run it for calibration or for verification. An op onnxruntime does not know is named,
    with the options that avoid running the model."""
    model, where = source.proto, source.where
    try:
        input_session(source)
    except Exception as exc:  # onnxruntime raises its own exception types, one per status code
        message = onnxruntime_message(exc)
        unknown = _ORT_UNKNOWN_OP.search(message)
        if unknown is not None:
            domain, op = unknown.groups()
            node = next((n.name for n in model.graph.node if n.op_type == op and n.domain == domain), "")
            what = f"node {node!r}: " if node else ""
            if abits is not None:
                hint = (
                    "it cannot be calibrated; use --abits none --no-verify for weight-only quantization "
                    "(that node stays float)"
                )
            else:
                hint = "it cannot be verified; add --no-verify to compile without the check (that node stays float)"
            raise UnsupportedModelError(
                f"{where}: {what}op {op!r} of domain {domain!r} is unknown to onnxruntime, so {hint}"
            )
        if "opset" in message.lower() and "support" in message.lower():
            raise UnsupportedModelError(f"{where}: onnxruntime does not support the model's opset: {message}")
        raise InvalidModelError(f"{where}: onnxruntime cannot load the model: {message}")



@contextlib.contextmanager
def session_model(graph: gs.Graph, folder: Path | None = None, inline_limit: int = 256 << 20) -> Iterator[bytes | str]:
    """What an onnxruntime session loads the graph from: its bytes, or (a model whose weights
    reach ``inline_limit``) the path of a copy written with external data in a temporary folder
    inside ``folder`` (the system's by default), which onnxruntime maps instead of copying."""
    if graph_bytes(graph) < inline_limit:
        model = graph_to_model(graph).SerializeToString()
        yield model
        return
    with owned.temporary_folder(folder) as tmp:
        path = Path(tmp) / "model.onnx"
        files, _ = model_files(graph, path, external_data=True)
        for file, contents in files.items():  # a scratch copy: neither renamed nor synced
            with open(file, "wb") as f:
                if callable(contents):
                    contents(f)
                else:
                    f.write(contents)
        yield str(path)

"""Reading models (with a clear error for anything that is not a valid ONNX model) and
writing outputs atomically: a temporary file in the target folder, then a rename, so that a
reader never sees a half-written file and a failed compile leaves nothing behind."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, Message
from onnx import numpy_helper

from . import __version__
from .errors import InvalidModelError, UnsupportedModelError, UsageError, first_line

PRODUCER_NAME = "ocs-onnx"


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Loads and checks a model; raises InvalidModelError with a one-line reason."""
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "model"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise InvalidModelError(f"{path}: no such file")
        if path.is_dir():
            raise InvalidModelError(f"{path}: is a folder, expected an .onnx model file")
        if path.stat().st_size == 0:
            raise InvalidModelError(f"{path}: file is empty")
        try:
            model = onnx.load(str(path))
        except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
            raise InvalidModelError(f"{path}: not a readable ONNX model ({first_line(exc)})")
        except onnx.checker.ValidationError as exc:
            raise InvalidModelError(f"{path}: invalid external data ({first_line(exc)})")
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InvalidModelError(f"{where}: not an ONNX model (no graph or no nodes)")
    bad_text = _undecodable_text(model)
    if bad_text is not None:
        raise InvalidModelError(f"{where}: {bad_text}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{where}: fails onnx.checker: {first_line(exc)}")
    _check_opsets(model, where)
    _check_tensor_data(model, where)
    _check_inputs(model, where)
    return model


def _undecodable_text(message: Message) -> str | None:
    """The first text field that is not valid UTF-8, described. protobuf parses such a field
    (ONNX is proto2) and returns bytes for it, which nothing downstream expects."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for text in [value] if isinstance(value, (str, bytes)) else value:
                if isinstance(text, bytes):
                    return f"field {field.name!r} holds text that is not valid UTF-8 ({text[:40]!r})"
        elif field.type == field.TYPE_MESSAGE:
            for child in [value] if isinstance(value, Message) else value:
                found = _undecodable_text(child)
                if found is not None:
                    return found
    return None


def _check_opsets(model: onnx.ModelProto, where: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UnsupportedModelError(
                f"{where}: opset {opset.version} is newer than the newest this onnx knows ({newest}); "
                f"export the model at opset {newest} or lower"
            )


def _check_tensor_data(model: onnx.ModelProto, where: str) -> None:
    """Every weight's data must match its element type and dims: onnx.checker does not look,
    and a mismatch would otherwise surface deep inside a pass."""
    tensors = [("initializer", t) for t in model.graph.initializer]
    tensors += [
        (f"Constant node {node.name!r}", a.t)
        for node in model.graph.node
        for a in node.attribute
        if a.type == onnx.AttributeProto.TENSOR
    ]
    for what, tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # read from its file by onnx.load; a ModelProto passed in keeps it there
        try:
            numpy_helper.to_array(tensor)
        except Exception as exc:  # KeyError for unknown types, ValueError for sizes, ...
            raise InvalidModelError(
                f"{where}: {what} {tensor.name!r} holds data that does not match its type and shape "
                f"{list(tensor.dims)} ({type(exc).__name__}: {first_line(exc)})"
            )


def _check_inputs(model: onnx.ModelProto, where: str) -> None:
    """Calibration and verification feed every model input with tensors whose first axis is
    the samples: inputs that cannot be fed so are refused here, before any work."""
    known_types = set(onnx.TensorProto.DataType.values())
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type not in known_types:
            raise InvalidModelError(
                f"{where}: tensor {value.name!r} has element type {value.type.tensor_type.elem_type}, "
                "which is not an ONNX type"
            )
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            kind = value.type.WhichOneof("value") or "no type"
            raise UnsupportedModelError(
                f"{where}: model input {value.name!r} is a {kind}; only tensor inputs are supported"
            )
        tensor_type = value.type.tensor_type
        try:
            onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except KeyError:
            raise UnsupportedModelError(
                f"{where}: model input {value.name!r} has element type "
                f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}, which has no numpy equivalent"
            )
        dims = tensor_type.shape.dim
        if tensor_type.HasField("shape") and len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 0:
            raise UnsupportedModelError(
                f"{where}: model input {value.name!r} has a fixed batch (first) dimension of 0, so it holds no "
                "sample; export it with a dynamic or positive batch dimension"
            )


# The prefix onnxruntime puts on every error: "[ONNXRuntimeError] : 1 : FAIL : ".
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")


def onnxruntime_message(exc: BaseException) -> str:
    """The first line of an onnxruntime error without its status-code prefix."""
    return _ORT_PREFIX.sub("", first_line(exc))


def check_onnxruntime_loads(model: onnx.ModelProto, where: str, abits: int | None) -> None:
    """Fails early, with the reason, when onnxruntime cannot load the float model: it would have
    to run it for calibration or for verification. An op onnxruntime does not know is named,
    with the options that avoid running the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    # Loading checks types, shapes and ops; optimizing would only cost time here.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
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


def graph_to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Exports the graph with a fixed producer and the lowest IR version its opsets allow,
    so that the bytes depend only on the graph (determinism) and older runtimes load it."""
    model = gs.export_onnx(graph, do_type_check=True)
    model.producer_name = PRODUCER_NAME
    model.producer_version = __version__
    model.ir_version = max(8, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    return model


def model_to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def default_output_path(input_path: Path) -> Path:
    """model.onnx -> model.q.onnx, beside the input."""
    return input_path.with_name(input_path.stem + ".q.onnx")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    write_files_atomic({Path(path): data})


def write_files_atomic(files: dict[Path, bytes]) -> None:
    """Writes every file to a temporary file beside it first, and renames them only once all
    are written: a failure (full disk, interrupt) leaves none of them and no temporary file."""
    pending: dict[Path, str] = {}
    try:
        for path, data in files.items():
            path = Path(path)
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir():
                raise UsageError(f"cannot write {path}: folder {folder} does not exist")
            fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
            pending[path] = tmp_name
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp_name in list(pending.items()):
            os.replace(tmp_name, path)
            del pending[path]
    except BaseException:
        for tmp_name in pending.values():
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
        raise


def save_model_atomic(model: onnx.ModelProto, path: Path) -> None:
    write_bytes_atomic(path, model.SerializeToString(deterministic=True))

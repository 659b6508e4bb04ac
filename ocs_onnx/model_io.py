"""Reading models (with a clear error for anything that is not a valid ONNX model) and
writing outputs atomically: a temporary file in the target folder, then a rename, so that a
reader never sees a half-written file and a failed compile leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from . import __version__
from .errors import InvalidModelError, UsageError, first_line

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
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{where}: fails onnx.checker: {first_line(exc)}")
    return model


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
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def save_model_atomic(model: onnx.ModelProto, path: Path) -> None:
    write_bytes_atomic(path, model.SerializeToString(deterministic=True))

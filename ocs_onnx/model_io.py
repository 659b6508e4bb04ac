"""Reading models (with a clear error for anything that is not a valid ONNX model) and
writing outputs atomically: a temporary file in the target folder, then a rename, so that a
reader never sees a half-written file and a failed compile leaves nothing behind.

Weights stored as external data are memory-mapped, not read (see ``external_data.py``), and the
graph copies that only need the model's structure (the checker, shape inference, calibration)
leave the large weights out (``graph_skeleton``).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, Message
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from . import __version__
from .errors import InvalidModelError, UnsupportedModelError, UsageError, first_line
from .external_data import (
    EXTERNAL_MIN_BYTES,
    MAPPABLE_TYPES,
    all_tensors,
    DataLayout,
    MappedData,
    check_external_tensors,
    data_file_name,
    map_external_data,
)

PRODUCER_NAME = "ocs-onnx"


# protobuf cannot serialize a message of 2 GiB or more; a model that big is written with its
# weights in a data file.
PROTOBUF_LIMIT = 2**31
# Room kept below that limit for everything but the weights' bytes (names, nodes, headers).
PROTOBUF_MARGIN = 64 << 20


@dataclass
class ModelSource:
    """A loaded and checked model: the ModelProto, and the weights held outside it as arrays
    (external data, memory-mapped; large weights of a model file, lifted out of its protobuf)."""

    proto: onnx.ModelProto
    where: str
    path: Path | None = None
    external: MappedData = field(default_factory=MappedData)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # The model's size: its protobuf and its external data.
    bytes: int = 0

    @property
    def input_files(self) -> list[Path]:
        """The files the model is made of: the model and its data files."""
        return ([self.path] if self.path is not None else []) + list(self.external.files)

    def release(self, array: np.ndarray | None = None) -> None:
        """See ``MappedData.release``."""
        self.external.release(array)


def load_model(source: str | os.PathLike | onnx.ModelProto) -> ModelSource:
    """Loads and checks a model; raises InvalidModelError with a one-line reason. The external
    data of a model file is checked (where it is, how big) before any of it is read."""
    if isinstance(source, onnx.ModelProto):
        model, where, path = source, "model", None
        if any(uses_external_data(t) for _, t in all_tensors(model)):
            raise InvalidModelError(
                "model: holds tensors whose external data is not loaded; pass the model's path instead"
            )
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
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
            raise InvalidModelError(f"{path}: not a readable ONNX model ({first_line(exc)})")
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InvalidModelError(f"{where}: not an ONNX model (no graph or no nodes)")
    bad_text = _undecodable_text(model)
    if bad_text is not None:
        raise InvalidModelError(f"{where}: {bad_text}")
    refs = check_external_tensors(model, path.parent, where) if path is not None else []
    external = map_external_data(model, refs) if refs else MappedData()
    arrays = dict(external.arrays)
    if path is not None and not refs:
        model, lifted = _lift_weights(model, where)
        arrays.update(lifted)
    try:
        onnx.checker.check_model(_without(model, arrays) if arrays else model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{where}: fails onnx.checker: {first_line(exc)}")
    except ValueError as exc:  # a model file beyond 2 GiB without external data
        raise InvalidModelError(f"{where}: cannot be checked: {first_line(exc)}")
    _check_opsets(model, where)
    _check_tensor_data(model, where, held=arrays)
    _check_inputs(model, where)
    size = (path.stat().st_size if path is not None else model.ByteSize()) + external.bytes
    return ModelSource(model, where, path, external, arrays, size)


def _lift_weights(model: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Moves the large weights of a model read from one file out of its protobuf: arrays, and a
    new ModelProto without their data. protobuf frees a message's memory only with the message,
    and the copies made of the graph would otherwise hold the weights a second time."""
    lifted = {}
    for tensor in model.graph.initializer:
        dtype = MAPPABLE_TYPES.get(tensor.data_type)
        if dtype is None or tensor.ByteSize() < SKELETON_MIN_BYTES or not tensor.HasField("raw_data"):
            continue
        shape = tuple(int(d) for d in tensor.dims)
        raw = tensor.raw_data  # a copy; the array is a read-only view of it
        values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if values.size != int(np.prod(shape, dtype=np.int64)):
            raise InvalidModelError(
                f"{where}: initializer {tensor.name!r} holds {len(raw)} bytes of data, its type and shape "
                f"{list(shape)} need {int(np.prod(shape, dtype=np.int64)) * values.itemsize}"
            )
        lifted[tensor.name] = values.reshape(shape)
        tensor.ClearField("raw_data")
    if not lifted:
        return model, lifted
    return onnx.ModelProto.FromString(model.SerializeToString()), lifted


def _without(model: onnx.ModelProto, mapped: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model for the checker, with the initializers held as arrays as graph inputs
    of their type and shape: the checker would look for the data files of mapped ones relative
    to the working folder (or refuse a symlink inside the model's folder), and would need the
    others serialized whole. check_external_tensors and _lift_weights have checked them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # small: those initializers hold no data
    initializers = copy.graph.initializer
    inputs = {value.name for value in copy.graph.input}
    for index in reversed(range(len(initializers))):
        tensor = initializers[index]
        if tensor.name in mapped:
            if tensor.name not in inputs:
                copy.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
            del initializers[index]
    return copy


def _undecodable_text(message: Message) -> str | None:
    """The first text field that is not valid UTF-8, described. protobuf parses such a field
    (ONNX is proto2) and returns bytes for it, which nothing downstream expects."""
    for descriptor, value in message.ListFields():
        if descriptor.type == descriptor.TYPE_STRING:
            for text in [value] if isinstance(value, (str, bytes)) else value:
                if isinstance(text, bytes):
                    return f"field {descriptor.name!r} holds text that is not valid UTF-8 ({text[:40]!r})"
        elif descriptor.type == descriptor.TYPE_MESSAGE:
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


def _check_tensor_data(model: onnx.ModelProto, where: str, held: dict[str, np.ndarray]) -> None:
    """Every weight's data must match its element type and dims: onnx.checker does not look,
    and a mismatch would otherwise surface deep inside a pass. (``held``: initializers whose
    data is an array, checked when it was made.)"""
    tensors = [("initializer", t) for t in model.graph.initializer]
    tensors += [
        (f"Constant node {node.name!r}", a.t)
        for node in model.graph.node
        for a in node.attribute
        if a.type == onnx.AttributeProto.TENSOR
    ]
    for what, tensor in tensors:
        if uses_external_data(tensor) or (what == "initializer" and tensor.name in held):
            continue  # mapped or lifted, its size checked against its type and shape
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


def input_session(source: ModelSource):
    """An onnxruntime session on the input model, unoptimized, and what to feed it besides the
    model's inputs: its large weights are graph inputs fed from the arrays (see graph_skeleton),
    which onnxruntime reads in place instead of copying the model's weights."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    # Loading checks types, shapes and ops; optimizing would only cost time here.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model, left_out = graph_skeleton(model_to_graph(source))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, left_out


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


# --------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------


def graph_to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Exports the graph with a fixed producer and the lowest IR version its opsets allow,
    so that the bytes depend only on the graph (determinism) and older runtimes load it.

    Weights held as arrays are copied once, into the model's tensors: onnx-graphsurgeon's
    exporter would make each a TensorProto and copy all of them into the graph, two copies of
    the model's weights at once.
    """
    model, held = _export_without_arrays(graph)
    for tensor in model.graph.initializer:
        if tensor.name in held:
            tensor.raw_data = little_endian(constant_array(held[tensor.name])).tobytes()
    return model


def _export_without_arrays(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, gs.Constant]]:
    """The exported model with the tensors of array-held weights (1 KiB or more) left without
    their data, and those constants by name."""
    held = {
        name: t
        for name, t in graph.tensors().items()
        if isinstance(t, gs.Constant)
        and (not isinstance(t._values, LazyValues) or isinstance(t._values, ComputedValues))
        and _is_plain(t)
        and constant_nbytes(t) >= EXTERNAL_MIN_BYTES
    }

    def empty(name: str, constant: gs.Constant) -> onnx.TensorProto:
        return onnx.TensorProto(name=name, data_type=dtype_to_onnx(constant._values.dtype), dims=constant.shape)

    with _stubbed(held, empty):
        return _export(graph), held


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as ONNX stores raw data: C order, little-endian."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _export(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=True)
    model.producer_name = PRODUCER_NAME
    model.producer_version = __version__
    model.ir_version = max(8, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    return model


def model_to_graph(model: ModelSource | onnx.ModelProto) -> gs.Graph:
    """The graph of a model; external weights become constants whose values are their mapped
    arrays."""
    if isinstance(model, onnx.ModelProto):
        return gs.import_onnx(model)
    graph = gs.import_onnx(model.proto)
    arrays = model.arrays
    if arrays:
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Constant) and name in arrays:
                tensor.values = arrays[name]
                tensor.data_location = None
    return graph


class ComputedValues(LazyValues):
    """Values computed from others each time they are read, e.g. a weight after channel splits
    computed from the original weight: never stored, so that a large model does not hold a
    second copy of its weights between passes."""

    def __init__(self, compute: Callable[[], np.ndarray], shape, dtype):
        self.compute = compute
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        values = self.compute()
        if values.shape != self.shape or values.dtype != self.dtype:
            raise RuntimeError(
                f"computed values of shape {values.shape}, {values.dtype}; expected {self.shape}, {self.dtype}"
            )
        return values

    @property
    def tensor(self) -> onnx.TensorProto:  # what onnx-graphsurgeon's exporter reads from lazy values
        return numpy_helper.from_array(np.ascontiguousarray(self.load()))


class ComputedConstant(gs.Constant):
    """A constant whose ``values`` (when ComputedValues) are computed on every read, not kept."""

    @property
    def values(self) -> np.ndarray:
        return self._values.load() if isinstance(self._values, LazyValues) else self._values

    @values.setter
    def values(self, values) -> None:
        self._values = values


def constant_nbytes(constant: gs.Constant) -> int:
    """Bytes of a constant's values, without loading them."""
    values = constant._values
    return int(values.nbytes) if hasattr(values, "nbytes") else int(np.asarray(constant.values).nbytes)


def constant_array(constant: gs.Constant) -> np.ndarray:
    """A constant's values, without keeping a loaded copy in the graph (onnx-graphsurgeon keeps
    what ``Constant.values`` loads)."""
    values = constant._values
    return values.load() if isinstance(values, LazyValues) else constant.values


def _is_plain(constant: gs.Constant) -> bool:
    """A constant exported as its values' bytes (not sparse, no dtype conversion on export)."""
    values = constant._values
    if isinstance(values, SparseValues):
        return False
    if constant._export_dtype is not None and dtype_to_onnx(constant._export_dtype) != dtype_to_onnx(values.dtype):
        return False
    try:
        return np.dtype(values.dtype).kind in "biufc" and dtype_to_onnx(values.dtype) != onnx.TensorProto.STRING
    except TypeError:  # an ONNX type numpy has no name for
        return False


class _Stub(LazyValues):
    """Stands in for a constant's values while a graph is exported: the TensorProto it exports
    has the constant's type and shape and no data (``tensor`` is what the exporter takes)."""

    def __init__(self, tensor: onnx.TensorProto, shape, dtype):
        self.tensor, self.shape, self.dtype = tensor, tuple(shape), dtype
        self.nbytes = 0

    def load(self):
        raise RuntimeError("a stub has no values")


@contextlib.contextmanager
def _stubbed(constants: dict[str, gs.Constant], make_tensor: Callable[[str, gs.Constant], onnx.TensorProto]):
    """Within the block, the given constants export as ``make_tensor(name, constant)``."""
    saved = {}
    try:
        for name, constant in constants.items():
            values = constant._values
            saved[name] = values
            constant._values = _Stub(make_tensor(name, constant), values.shape, values.dtype)
        yield
    finally:
        for name, values in saved.items():
            constants[name]._values = values


# Constants at least this large are left out of the graph copies that need only its structure.
SKELETON_MIN_BYTES = 1 << 20


def graph_skeleton(graph: gs.Graph, min_bytes: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """The graph as a model in which every constant of ``min_bytes`` or more is a graph input of
    its type and shape instead of an initializer: what the checker, shape inference and
    calibration need, without a copy of the weights. Returns it and {name: left-out Constant}.
    ``min_bytes`` defaults to SKELETON_MIN_BYTES."""
    min_bytes = SKELETON_MIN_BYTES if min_bytes is None else min_bytes
    large = {
        name: t
        for name, t in graph.tensors().items()
        if isinstance(t, gs.Constant) and _is_plain(t) and constant_nbytes(t) >= min_bytes
    }

    def empty(name: str, constant: gs.Constant) -> onnx.TensorProto:
        return onnx.TensorProto(name=name, data_type=dtype_to_onnx(constant._values.dtype), dims=constant.shape)

    with _stubbed(large, empty):
        model = graph_to_model(graph)
    initializers = model.graph.initializer
    for index in reversed(range(len(initializers))):
        if initializers[index].name in large:
            del initializers[index]
    for name, constant in large.items():
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(name, dtype_to_onnx(constant._values.dtype), list(constant.shape))
        )
    return model, large


def graph_from_skeleton(model: onnx.ModelProto, left_out: dict[str, gs.Constant]) -> gs.Graph:
    """The graph of a model made by ``graph_skeleton`` (e.g. after shape inference), with the
    left-out constants back in place."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for name, constant in left_out.items():
        tensor = tensors.get(name)
        if tensor is None or isinstance(tensor, gs.Constant):
            continue
        kind = type(constant)
        tensor.to_constant(constant._values, export_dtype=constant._export_dtype)
        tensor.__class__ = kind
        tensor.data_location = constant.data_location
    graph.inputs = [t for t in graph.inputs if t.name not in left_out]
    return graph


def graph_bytes(graph: gs.Graph) -> int:
    """Bytes of all the graph's constants."""
    return sum(constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant))


def parameter_count(graph: gs.Graph) -> int:
    return int(sum(np.prod(t.shape, dtype=np.int64) for t in graph.tensors().values() if isinstance(t, gs.Constant)))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def default_output_path(input_path: Path) -> Path:
    """model.onnx -> model.q.onnx, beside the input."""
    return input_path.with_name(input_path.stem + ".q.onnx")


# A file's contents: bytes, or a function that writes them to an open file (streaming).
Contents = bytes | Callable[[BinaryIO], None]


def model_files(graph: gs.Graph, path: Path, external_data: bool = False) -> tuple[dict[Path, Contents], int]:
    """The files of the model written at ``path``, and their total size in bytes.

    One protobuf file, unless ``external_data`` is asked for or the model would reach
    protobuf's 2 GiB limit: then every constant of ``EXTERNAL_MIN_BYTES`` or more goes to
    ``<path>.data`` beside it (its location in the model is that file name), streamed from
    the arrays when the file is written. The bytes depend only on the graph.
    """
    path = Path(path)
    if not external_data and graph_bytes(graph) < PROTOBUF_LIMIT - PROTOBUF_MARGIN:
        write, size = serialized_model(graph)
        return {path: write}, size
    layout = DataLayout(data_file_name(path))
    large = {
        name: t
        for name, t in graph.tensors().items()
        if isinstance(t, gs.Constant) and _is_plain(t) and constant_nbytes(t) >= EXTERNAL_MIN_BYTES
    }
    places = {name: layout.add(name, constant_nbytes(c), lambda c=c: constant_array(c)) for name, c in large.items()}

    def stub(name: str, constant: gs.Constant) -> onnx.TensorProto:
        return layout.stub(name, dtype_to_onnx(constant._values.dtype), constant.shape, *places[name])

    with _stubbed(large, stub):
        data = graph_to_model(graph).SerializeToString(deterministic=True)
    return {path: data, path.with_name(layout.location): layout.write}, len(data) + layout.size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int) -> bytes:
    """The key of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2)


def _fields(message: Message, keep: Callable[[int], bool]) -> bytes:
    """The message serialized with only the fields whose numbers ``keep`` accepts."""
    part = type(message)()
    part.CopyFrom(message)
    for descriptor, _ in message.ListFields():
        if not keep(descriptor.number):
            part.ClearField(descriptor.name)
    return part.SerializeToString(deterministic=True)


# Field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def serialized_model(graph: gs.Graph) -> tuple[Callable[[BinaryIO], None], int]:
    """A function writing the model's protobuf serialization to a file, and its size: the bytes
    of ``graph_to_model(graph).SerializeToString(deterministic=True)``, written tensor by tensor.

    protobuf serializes a message whole, into a buffer that grows as it goes and is then copied:
    with the model itself, that held the weights about four times over. Here the parts around
    the weights are serialized by protobuf (fields in field-number order, as its deterministic
    serialization writes them) and each weight's bytes go straight from its array to the file.
    """
    model, held = _export_without_arrays(graph)
    graph_proto = model.graph
    entries: list[tuple[bytes, gs.Constant | None, int]] = []  # (bytes before the data, constant, data bytes)
    for tensor in graph_proto.initializer:
        head = tensor.SerializeToString(deterministic=True)
        constant = held.get(tensor.name)
        if constant is None:
            entries.append((_key(_GRAPH_INITIALIZER) + _varint(len(head)) + head, None, 0))
            continue
        length = constant_nbytes(constant)
        raw_key = _key(_TENSOR_RAW_DATA) + _varint(length)  # raw_data follows every field the tensor has
        body = len(head) + len(raw_key) + length
        entries.append((_key(_GRAPH_INITIALIZER) + _varint(body) + head + raw_key, constant, length))
    graph_head = _fields(graph_proto, lambda number: number < _GRAPH_INITIALIZER)
    graph_tail = _fields(graph_proto, lambda number: number > _GRAPH_INITIALIZER)
    graph_size = len(graph_head) + sum(len(prefix) + length for prefix, _, length in entries) + len(graph_tail)
    model_head = _fields(model, lambda number: number < _MODEL_GRAPH)
    model_tail = _fields(model, lambda number: number > _MODEL_GRAPH)
    graph_key = _key(_MODEL_GRAPH) + _varint(graph_size)

    def write(f: BinaryIO) -> None:
        f.write(model_head + graph_key + graph_head)
        for prefix, constant, _ in entries:
            f.write(prefix)
            if constant is not None:
                f.write(memoryview(little_endian(constant_array(constant)).reshape(-1)).cast("B"))
        f.write(graph_tail + model_tail)

    return write, len(model_head) + len(graph_key) + graph_size + len(model_tail)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    write_files_atomic({Path(path): data})


def write_files_atomic(files: dict[Path, Contents]) -> None:
    """Writes every file to a temporary file beside it first, and renames them only once all
    are written: a failure (full disk, interrupt) leaves none of them and no temporary file.
    A file's contents are bytes or a function writing them to the open file."""
    pending: dict[Path, str] = {}
    try:
        for path, contents in files.items():
            path = Path(path)
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir():
                raise UsageError(f"cannot write {path}: folder {folder} does not exist")
            fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
            pending[path] = tmp_name
            with os.fdopen(fd, "wb") as f:
                if callable(contents):
                    contents(f)
                else:
                    f.write(contents)
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


def save_graph_atomic(graph: gs.Graph, path: Path, external_data: bool = False) -> None:
    write_files_atomic(model_files(graph, path, external_data)[0])


@contextlib.contextmanager
def session_model(graph: gs.Graph, folder: Path | None = None, inline_limit: int = 256 << 20) -> Iterator[bytes | str]:
    """What an onnxruntime session loads the graph from: its bytes, or (a model whose weights
    reach ``inline_limit``) the path of a copy written with external data in a temporary folder
    inside ``folder`` (the system's by default), which onnxruntime maps instead of copying."""
    if graph_bytes(graph) < inline_limit:
        model = graph_to_model(graph).SerializeToString()
        yield model
        return
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ocs-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        files, _ = model_files(graph, path, external_data=True)
        for file, contents in files.items():  # a scratch copy: neither renamed nor synced
            with open(file, "wb") as f:
                if callable(contents):
                    contents(f)
                else:
                    f.write(contents)
        yield str(path)

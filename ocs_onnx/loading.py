"""Reading models, with a clear one-line error for anything that is not a valid ONNX model.

Weights stored as external data are memory-mapped, not read (see ``external_data.py``); the large
weights of a one-file model are lifted out of its protobuf into arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, Message
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from . import gs_adapter
from .errors import InvalidModelError, UnsupportedModelError, first_line
from .external_data import MAPPABLE_TYPES, MappedData, all_tensors, check_external_tensors, map_external_data


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

    def graph(self) -> gs.Graph:
        """The model's graph; weights held as arrays are constants whose values are those arrays."""
        return gs_adapter.model_to_graph(self.proto, self.arrays)


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
    if len(model.graph.sparse_initializer) or _has_sparse_constants(model):
        if isinstance(source, onnx.ModelProto):  # the caller's model is never modified
            model = onnx.ModelProto.FromString(model.SerializeToString())
        _densify_sparse_weights(model, where)
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


# A sparse weight becomes dense at load: at most this many bytes (its dims are only declared).
MAX_DENSIFIED_BYTES = 4 << 30


def _densify_sparse_weights(model: onnx.ModelProto, where: str) -> None:
    """Sparse initializers and Constant nodes with a ``sparse_value`` become dense tensors: the
    quantized weights are dense anyway (onnxruntime densifies sparse initializers when it loads
    a model too), and every pass then sees one kind of weight."""
    graph = model.graph
    for sparse in list(graph.sparse_initializer):
        graph.initializer.append(_dense(sparse, where, f"sparse initializer {sparse.values.name!r}"))
        graph.sparse_initializer.remove(sparse)
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attribute in node.attribute:
            if attribute.name == "sparse_value":
                dense = _dense(attribute.sparse_tensor, where, f"Constant node {node.name!r}")
                node.attribute.remove(attribute)
                node.attribute.append(onnx.helper.make_attribute("value", dense))
                break


def _has_sparse_constants(model: onnx.ModelProto) -> bool:
    return any(
        a.name == "sparse_value" for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
    )


def _dense(sparse: onnx.SparseTensorProto, where: str, what: str) -> onnx.TensorProto:
    dims = tuple(int(d) for d in sparse.dims)
    if uses_external_data(sparse.values) or uses_external_data(sparse.indices):
        raise UnsupportedModelError(f"{where}: {what} keeps its data in an external file; store it in the model")
    try:
        values = numpy_helper.to_array(sparse.values).reshape(-1)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        nbytes = int(np.prod(dims, dtype=np.int64)) * values.itemsize
        if nbytes > MAX_DENSIFIED_BYTES:
            raise UnsupportedModelError(
                f"{where}: {what} would take {nbytes:,} bytes dense, more than the {MAX_DENSIFIED_BYTES:,} "
                "ocs-onnx makes of a sparse weight"
            )
        size = int(np.prod(dims, dtype=np.int64))
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        # ONNX: indices in range and strictly increasing (each position once); numpy would wrap
        # a negative one around and take a repeated one silently
        if flat.size != values.size or (flat.size and (flat.min() < 0 or flat.max() >= size or np.any(np.diff(flat) <= 0))):
            raise ValueError("indices out of range, repeated or not in increasing order")
        dense = np.zeros(size, dtype=values.dtype)
        dense[flat] = values
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise InvalidModelError(f"{where}: {what} holds indices or values that do not fit its dims {list(dims)} "
                                f"({first_line(exc)})")
    return numpy_helper.from_array(dense.reshape(dims), sparse.values.name)


def _lift_weights(model: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Moves the large weights of a model read from one file out of its protobuf: arrays, and a
    new ModelProto without their data. protobuf frees a message's memory only with the message,
    and the copies made of the graph would otherwise hold the weights a second time."""
    lifted = {}
    for tensor in model.graph.initializer:
        dtype = MAPPABLE_TYPES.get(tensor.data_type)
        if dtype is None or tensor.ByteSize() < gs_adapter.SKELETON_MIN_BYTES or not tensor.HasField("raw_data"):
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
    the samples, and compare outputs as tensors: inputs that cannot be fed so, and outputs
    that are not tensors, are refused here, before any work."""
    known_types = set(onnx.TensorProto.DataType.values())
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type not in known_types:
            raise InvalidModelError(
                f"{where}: tensor {value.name!r} has element type {value.type.tensor_type.elem_type}, "
                "which is not an ONNX type"
            )
    for value in model.graph.output:
        if value.type.WhichOneof("value") not in ("tensor_type", None):
            raise UnsupportedModelError(
                f"{where}: model output {value.name!r} is a {value.type.WhichOneof('value')}; "
                "only tensor outputs are supported"
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


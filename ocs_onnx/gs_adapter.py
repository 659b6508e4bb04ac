"""The one place that knows onnx-graphsurgeon's internals.

ocs-onnx holds weights as numpy arrays (memory-mapped from a data file, or computed from the
original weight on every read), exports graphs without copying them, and makes structure-only
copies of a graph for the checker, shape inference and calibration. onnx-graphsurgeon has no
public API for that, so this module reads its private fields (``Constant._values``,
``Constant._export_dtype``, ``LazyValues``, the exporter's ``dtype_to_onnx``); nothing else in
ocs-onnx does. The versions it is known to work with are pinned in pyproject.toml and checked
by tests/test_gs_adapter.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from . import __version__
from .external_data import EXTERNAL_MIN_BYTES

PRODUCER_NAME = "ocs-onnx"


def graph_to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Exports the graph with a fixed producer and the lowest IR version its opsets allow,
    so that the bytes depend only on the graph (determinism) and older runtimes load it.

    Weights held as arrays are copied once, into the model's tensors: onnx-graphsurgeon's
    exporter would make each a TensorProto and copy all of them into the graph, two copies of
    the model's weights at once.
    """
    model, held = export_without_arrays(graph)
    for tensor in model.graph.initializer:
        if tensor.name in held:
            tensor.raw_data = little_endian(constant_array(held[tensor.name])).tobytes()
    return model


def export_without_arrays(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, gs.Constant]]:
    """The exported model with the tensors of array-held weights (1 KiB or more) left without
    their data, and those constants by name."""
    held = {
        name: t
        for name, t in graph.tensors().items()
        if isinstance(t, gs.Constant)
        and (not isinstance(t._values, LazyValues) or isinstance(t._values, ComputedValues))
        and is_plain(t)
        and constant_nbytes(t) >= EXTERNAL_MIN_BYTES
    }

    with stubbed(held, empty_tensor):
        return _export(graph), held


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as ONNX stores raw data: C order, little-endian."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


# Value types onnx-graphsurgeon's exporter writes; it fails on the others (optional, map).
EXPORTED_VALUE_TYPES = ("tensor_type", "sequence_type", "sparse_tensor_type")


def _export(graph: gs.Graph) -> onnx.ModelProto:
    with _untyped_other_values(graph):
        model = gs.export_onnx(graph, do_type_check=True)
    untyped = [v for v in model.graph.value_info if not v.HasField("type")]
    for value in untyped:
        model.graph.value_info.remove(value)
    model.producer_name = PRODUCER_NAME
    model.producer_version = __version__
    model.ir_version = max(8, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    return model


@contextlib.contextmanager
def _untyped_other_values(graph: gs.Graph):
    """Intermediate tensors of a type the exporter cannot write (an Optional op's output, say)
    are exported without a type: value_info is only a hint, and shape inference gives it back.
    (Graph inputs and outputs of such types are refused when the model is loaded.)"""
    others = [
        t
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable) and t.dtype is not None and getattr(t, "type", None) not in EXPORTED_VALUE_TYPES
    ]
    dtypes = [t.dtype for t in others]
    for t in others:
        t.dtype = None
    try:
        yield
    finally:
        for t, dtype in zip(others, dtypes):
            t.dtype = dtype


def model_to_graph(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> gs.Graph:
    """The graph of a model; weights held outside its protobuf (``arrays``, by name: mapped
    external data, lifted weights) become constants whose values are those arrays."""
    graph = gs.import_onnx(model)
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


def is_plain(constant: gs.Constant) -> bool:
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


def onnx_type(constant: gs.Constant) -> int:
    """The ONNX element type of a constant's values (without loading them)."""
    return dtype_to_onnx(constant._values.dtype)


def empty_tensor(name: str, constant: gs.Constant) -> onnx.TensorProto:
    """A TensorProto of the constant's type and shape without data (see ``stubbed``)."""
    return onnx.TensorProto(name=name, data_type=onnx_type(constant), dims=constant.shape)


def large_constants(graph: gs.Graph, min_bytes: int) -> dict[str, gs.Constant]:
    """{name: constant} of the plain constants of ``min_bytes`` or more: those whose bytes can
    be written, or left out, as they are."""
    return {
        name: t
        for name, t in graph.tensors().items()
        if isinstance(t, gs.Constant) and is_plain(t) and constant_nbytes(t) >= min_bytes
    }


class _Stub(LazyValues):
    """Stands in for a constant's values while a graph is exported: the TensorProto it exports
    has the constant's type and shape and no data (``tensor`` is what the exporter takes)."""

    def __init__(self, tensor: onnx.TensorProto, shape, dtype):
        self.tensor, self.shape, self.dtype = tensor, tuple(shape), dtype
        self.nbytes = 0

    def load(self):
        raise RuntimeError("a stub has no values")


@contextlib.contextmanager
def stubbed(constants: dict[str, gs.Constant], make_tensor: Callable[[str, gs.Constant], onnx.TensorProto]):
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
    large = large_constants(graph, SKELETON_MIN_BYTES if min_bytes is None else min_bytes)

    with stubbed(large, empty_tensor):
        model = graph_to_model(graph)
    initializers = model.graph.initializer
    for index in reversed(range(len(initializers))):
        if initializers[index].name in large:
            del initializers[index]
    for name, constant in large.items():
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx_type(constant), list(constant.shape))
        )
    return model, large


def graph_from_skeleton(model: onnx.ModelProto, left_out: dict[str, gs.Constant]) -> gs.Graph:
    """The graph of a model made by ``graph_skeleton`` (e.g. after shape inference), with the
    left-out constants themselves back in place of the graph inputs that stood for them. They
    leave the graph they came from, which is not to be used afterwards."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for name, constant in left_out.items():
        stand_in = tensors.get(name)
        if stand_in is None or isinstance(stand_in, gs.Constant):
            continue
        constant.outputs.clear()  # detached from the old graph's nodes
        for node in list(stand_in.outputs):
            for index, t in enumerate(node.inputs):
                if t is stand_in:
                    node.inputs[index] = constant
        graph.outputs = [constant if t is stand_in else t for t in graph.outputs]
    graph.inputs = [t for t in graph.inputs if t.name not in left_out]
    return graph


def graph_bytes(graph: gs.Graph) -> int:
    """Bytes of all the graph's constants."""
    return sum(constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant))


def parameter_count(graph: gs.Graph) -> int:
    return int(sum(np.prod(t.shape, dtype=np.int64) for t in graph.tensors().values() if isinstance(t, gs.Constant)))


"""Net2Net widening (the OCS paper's Fig. 2a): the copies of a split layer's input channels are
computed by its producer, not copied at run time.

Weight OCS appends copies of some input channels to a layer's input x. When x is computed from
the output of a Conv/Gemm/MatMul (the *root*) by ops that act on each channel on its own
(activations, arithmetic with scalars or per-channel constants, BatchNormalization, pooling, a
Flatten of [N, C, 1, 1]), the root can compute the copies itself: its output rows (weights and bias) for those
channels are duplicated, and so is every per-channel constant on the way. Every tensor of that
*region* then carries C + k channels, the copies being exactly the values of the channels they
copy, and the split layer reads x directly.

A region is folded only when nothing outside it reads its tensors (other than the split layers
reading x, which must all want the same copies): a reader that needs exactly C channels would
need a Slice, a copy as large as the one folding saves.

Regions do not cross depthwise Convs, although a depthwise Conv is per-channel too (its group
count would grow with the copies): measured on PP-OCRv5's recognizer (W8A8, OCS 0.02, one
thread, batch 1), folding through them made the model 1.116x float where copies at run time
gave 1.067x and folding elsewhere only 1.039x. onnxruntime's int8 kernels are fastest at
aligned channel counts (a 1x1 Conv pair widened from 64 to 65 channels took 16 % longer, 29 %
with a depthwise Conv between them), and a folded depthwise Conv is one more layer at an
unaligned count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

# Ops that compute each output channel from the same channel of their input alone, with no
# constant inputs but scalars (Clip's bounds).
ELEMENTWISE_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Elu", "Selu", "Celu",
        "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Identity", "Neg", "Abs", "Exp", "Log", "Sqrt",
        "Reciprocal", "Clip",
    }
)  # fmt: skip
# Pooling acts on each channel of an NCHW tensor on its own (channels on axis 1).
POOLING = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
# Elementwise ops of several inputs: region tensors, scalars, or per-channel constants.
ELEMENTWISE_NARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


@dataclass
class Region:
    """The root whose output channels are duplicated, the per-channel nodes between its output
    and x, and every tensor from the root's output to x."""

    root: gs.Node
    nodes: list[gs.Node] = field(default_factory=list)
    tensors: list[gs.Variable] = field(default_factory=list)
    # The channel axis of every tensor, counted from the end (-1: the last axis): a Flatten of
    # [N, C, 1, 1] moves it.
    axes: dict[str, int] = field(default_factory=dict)


def output_channel_axis(node: gs.Node) -> int | None:
    """The channel axis (from the end) of a Conv/Gemm/MatMul output, and whether its output
    channels are rows of a constant weight: None when they are not."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) or len(node.outputs) != 1:
        return None
    weight = node.inputs[1].values
    if node.op == "Conv" and weight.ndim >= 3 and int(node.attrs.get("group", 1)) == 1:
        return -(weight.ndim - 1)
    if node.op == "Gemm" and weight.ndim == 2:
        return -1
    if node.op == "MatMul" and weight.ndim == 2:
        return -1
    return None


def _is_channel_constant(value: np.ndarray, axis: int, channels: int) -> bool:
    """A constant that broadcasts along the channel axis only (or a scalar)."""
    if value.size == 1:
        return value.ndim <= -axis
    return value.ndim >= -axis and value.shape[axis] == channels and value.size == channels


def _flattened_channels(node: gs.Node, axis: int) -> list[tuple[gs.Tensor, int]] | None:
    """Flatten(axis=1) of [N, C, 1, ...]: the channels move from axis 1 to the last axis."""
    x = node.inputs[0]
    if node.op != "Flatten" or int(node.attrs.get("axis", 1)) != 1 or axis != -1 or x.shape is None:
        return None
    if len(x.shape) < 2 or any(d != 1 for d in x.shape[2:]):
        return None
    return [(x, -(len(x.shape) - 1))]


def _per_channel_inputs(node: gs.Node, axis: int, channels: int) -> list[gs.Tensor] | None:
    """The variable inputs of a per-channel node (those that must be region tensors), or None
    when the node is not per-channel along ``axis``."""
    if len(node.outputs) != 1 and not (node.op == "Dropout" and not node.outputs[1].outputs):
        return None
    if node.domain not in (None, "", "ai.onnx"):
        return None
    variables = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
    constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
    if node.op == "Dropout":
        return variables[:1] if len(variables) == 1 else None
    if node.op in ELEMENTWISE_UNARY:
        if node.op == "PRelu":
            ok = len(variables) == 1 and all(_is_channel_constant(c.values, axis, channels) for c in constants)
        else:
            ok = len(variables) == 1 and all(c.values.size == 1 for c in constants)
        return variables if ok else None
    if node.op in ELEMENTWISE_NARY:
        ok = variables and all(_is_channel_constant(c.values, axis, channels) for c in constants)
        return variables if ok else None
    if node.op in POOLING:
        x = node.inputs[0]
        on_channel_axis = x.shape is not None and axis == -(len(x.shape) - 1)
        return [x] if on_channel_axis and len(node.outputs) == 1 and len(variables) == 1 else None
    if node.op == "BatchNormalization":
        x, params = node.inputs[0], node.inputs[1:5]
        if len(node.inputs) != 5 or not isinstance(x, gs.Variable) or x.shape is None:
            return None
        on_channel_axis = axis == -(len(x.shape) - 1)  # BatchNormalization's channels are axis 1
        constant = all(isinstance(p, gs.Constant) and p.values.shape == (channels,) for p in params)
        return [x] if on_channel_axis and constant else None
    return None


def find_region(x: gs.Variable, readers: set[int], graph_outputs: set[str], axis: int, channels: int) -> Region | None:
    """The region from a root to ``x`` along per-channel ops, if there is one that nothing but
    its own nodes and the nodes ``readers`` (ids) read; x's channel axis is ``axis`` (from the
    end) with ``channels`` channels."""
    region_nodes: dict[int, gs.Node] = {}
    tensors: dict[str, gs.Variable] = {}
    axes: dict[str, int] = {}
    root = None
    pending = [(x, axis)]
    while pending:
        t, t_axis = pending.pop()
        if t.name in tensors:
            if axes[t.name] != t_axis:
                return None
            continue
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or t.name in graph_outputs:
            return None
        tensors[t.name], axes[t.name] = t, t_axis
        producer = t.inputs[0]
        root_axis = output_channel_axis(producer)
        if root_axis is not None and producer.inputs[1].values.shape[_weight_out_axis(producer)] == channels:
            if root_axis != t_axis or (root is not None and root is not producer) or not _bias_widens(producer, channels):
                return None
            root = producer
            continue
        flattened = _flattened_channels(producer, t_axis)
        if flattened is not None:
            region_nodes[id(producer)] = producer
            pending.extend(flattened)
            continue
        inputs = _per_channel_inputs(producer, t_axis, channels)
        if inputs is None:
            return None
        region_nodes[id(producer)] = producer
        pending.extend((i, t_axis) for i in inputs)
    if root is None:
        return None
    for name, t in tensors.items():
        allowed = readers if t is x else set()
        if any(id(reader) not in region_nodes and id(reader) not in allowed for reader in t.outputs):
            return None
    if any(id(reader) not in readers for reader in x.outputs):
        return None
    return Region(root, list(region_nodes.values()), list(tensors.values()), axes)


def _bias_widens(root: gs.Node, channels: int) -> bool:
    """The root has no bias, a scalar one, or one whose last axis is its output channels."""
    if len(root.inputs) < 3 or not root.inputs[2].name:
        return True
    bias = root.inputs[2]
    if not isinstance(bias, gs.Constant):
        return False
    values = bias.values
    if values.size == 1:
        return True
    if root.op == "Conv":
        return values.shape == (channels,)
    return values.ndim >= 1 and values.shape[-1] == channels


def _weight_out_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # MatMul: (K, N)


def duplicated(values: np.ndarray, axis: int, copies: list[int]) -> np.ndarray:
    """``values`` with the slices ``copies`` along ``axis`` appended."""
    return np.concatenate([values, np.take(values, copies, axis=axis)], axis=axis)


def widen(region: Region, copies: list[int], unique_name, quantized: set[int]) -> list[gs.Node]:
    """Gives every tensor of the region the ``copies`` as extra channels: per-channel constants
    are replaced by duplicated ones, shapes follow. The root's weight rows, if the root is in
    ``quantized`` (ids of nodes whose weight the quantization passes own), are left to the
    caller; returns the nodes so left."""
    k = len(copies)
    owned = []
    root = region.root
    if id(root) in quantized:
        owned.append(root)
    else:
        root.inputs[1] = _duplicated_constant(root.inputs[1], _weight_out_axis(root), copies, unique_name)
    for node in region.nodes:
        for index, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.values.size > 1:
                axis = 0 if node.op == "BatchNormalization" else region.axes[node.outputs[0].name]
                node.inputs[index] = _duplicated_constant(t, axis, copies, unique_name)
    if len(region.root.inputs) > 2 and isinstance(region.root.inputs[2], gs.Constant):
        bias = region.root.inputs[2]
        if bias.values.size > 1:
            region.root.inputs[2] = _duplicated_constant(bias, -1, copies, unique_name)
    for t in region.tensors:
        axis = region.axes[t.name]
        if t.shape is not None and len(t.shape) >= -axis and isinstance(t.shape[axis], int):
            shape = list(t.shape)
            shape[axis] += k
            t.shape = shape
    return owned


def _duplicated_constant(constant: gs.Constant, axis: int, copies: list[int], unique_name) -> gs.Constant:
    return gs.Constant(unique_name(f"{constant.name}_ocs"), duplicated(constant.values, axis, copies))

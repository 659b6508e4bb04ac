"""fold-affine: a Mul or Add by a constant right after a Conv folds into the Conv's weights and
bias, so that the Conv and its integer kernel compute it; so does a scale (and, for a Conv
without padding, a shift) right before one.

paddle2onnx exports a Conv's bias as a separate ``Add(conv, Reshape(bias))``, and PP-LCNet-style
models put learnable affine blocks (a scalar scale and shift) after Convs. onnxruntime fuses such
an Add into the Conv in a float model, but not across QuantizeLinear/DequantizeLinear: each
would run as a float op between two integer kernels (52 of them in PP-OCRv5's detector).

    conv(x, W) * m + a = conv(x, W * m) + (b * m + a)      m, a: a scalar or one value per output channel

Sub by a constant is an Add of its negation. Div is left alone: multiplying by 1/d rounds
differently. Before a Conv (an affine block after an activation):

    conv(h * c, W) = conv(h, W * c)                  zero padding stays zero
    conv(x + b, W) = conv(x, W) + sum(W * b)         only without padding (a padded border stays 0, not b)
    h * c + b      = (h + b / c) * c                 with padding: the scale folds, the Add stays
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import AFFINE_FOLDED, BATCHNORMS_FOLDED, CONSTANT_WEIGHTS, TENSOR_TYPES
from ocs_onnx.pass_manager import GraphEffect, compiler_pass

FOLDABLE_OPS = ("Add", "Sub", "Mul")


def per_channel_values(constant: np.ndarray, out_channels: int, output_rank: int) -> np.ndarray | None:
    """The constant as one value per output channel of a Conv output ``[N, C, ...]`` of rank
    ``output_rank``, or None when broadcasting it would touch anything but the channel axis."""
    if constant.dtype != np.float32 or constant.ndim > output_rank:
        return None
    shape = (1,) * (output_rank - constant.ndim) + constant.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, out_channels):
        return None
    return np.broadcast_to(constant.reshape(-1), (out_channels,)).astype(np.float64)


def fold_affine_into_conv(w: np.ndarray, b: np.ndarray, op: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pure numeric fold of ``conv(x, w) + b`` followed by ``op`` with per-channel ``values``."""
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    if op == "Mul":
        return (w64 * values.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype), (b64 * values).astype(w.dtype)
    shift = values if op == "Add" else -values
    return w, (b64 + shift).astype(w.dtype)


def _fold_one(conv: gs.Node, graph_outputs: set[str], ctx: CompileContext) -> bool:
    out = conv.outputs[0]
    if len(out.outputs) != 1 or out.name in graph_outputs:
        return False
    consumer = out.outputs[0]
    if consumer.op not in FOLDABLE_OPS or consumer.domain not in (None, "", "ai.onnx") or len(consumer.inputs) != 2:
        return False
    if consumer.op == "Sub" and consumer.inputs[0] is not out:
        return False  # c - conv(x) would also negate the weights; rare, left alone
    other = consumer.inputs[1] if consumer.inputs[0] is out else consumer.inputs[0]
    if not isinstance(other, gs.Constant) or other is out:
        return False
    w = conv.inputs[1].values
    values = per_channel_values(np.asarray(other.values), w.shape[0], w.ndim)
    if values is None or not np.isfinite(values).all():
        return False
    b = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(w.shape[0], w.dtype)
    if b.shape != (w.shape[0],):
        return False
    w_new, b_new = fold_affine_into_conv(w, b, consumer.op, values)
    _set_weights(conv, w_new if w_new is not w else None, b_new, ctx)
    # the Conv now writes the op's output; the op is left without inputs and outputs
    result = consumer.outputs[0]
    consumer.outputs.clear()
    consumer.inputs.clear()
    conv.outputs[0] = result
    return True


def _set_weights(conv: gs.Node, weight: np.ndarray | None, bias: np.ndarray, ctx: CompileContext) -> None:
    """New constants for the Conv's folded weight (None: unchanged) and bias (added if it had none)."""
    if weight is not None:
        conv.inputs[1] = gs.Constant(ctx.unique_name(conv.inputs[1].name + "_affine"), weight)
    constant = gs.Constant(ctx.unique_name(f"{conv.name}_bias_affine"), bias)
    if len(conv.inputs) > 2:
        conv.inputs[2] = constant
    else:
        conv.inputs.append(constant)


def _valid_group(w_shape: tuple[int, ...], group: int) -> bool:
    return group >= 1 and w_shape[0] % group == 0 and w_shape[0] >= group


def input_channels(w_shape: tuple[int, ...], group: int) -> np.ndarray:
    """[C_out, C_in / group]: the input channel that weight ``w[o, j]`` multiplies."""
    out_channels, per_group = w_shape[0], w_shape[1]
    group_of = np.arange(out_channels) // (out_channels // group)
    return group_of[:, None] * per_group + np.arange(per_group)[None, :]


def _has_channels(t: gs.Tensor, channels: int, rank: int) -> bool:
    return t.shape is not None and len(t.shape) == rank and t.shape[1] == channels


def _unpadded(conv: gs.Node) -> bool:
    """Zero padding would not be shifted by an Add before the Conv: only without padding."""
    pads = conv.attrs.get("pads", [])
    return conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads)


def _reader_constant(node: gs.Node, x: gs.Tensor, op: str, graph_outputs: set[str]):
    """(data input, constant) when ``node`` is ``op`` of one activation and one constant and its
    output ``x`` is read by one node only."""
    if node.op != op or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
        return None
    if len(x.outputs) != 1 or x.name in graph_outputs:
        return None
    data = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
    if len(data) != 1 or len(constants) != 1:
        return None
    return data[0], constants[0]


def _fold_into_reader(conv: gs.Node, graph_outputs: set[str], ctx: CompileContext) -> int:
    """A Conv's input ``h * c (+ b)`` (PP-LCNet's affine block after an activation) folds into
    the Conv: ``conv(h * c, W) = conv(h, W * c)`` always (zero padding stays zero), and
    ``conv(x + b, W) = conv(x, W) + sum(W * b)`` only without padding. With padding,
    ``h * c + b`` becomes ``(h + b / c) * c`` and the scale still folds: one float op instead of
    two. Returns the number of ops folded."""
    w = conv.inputs[1].values
    if w.dtype != np.float32 or w.ndim < 3 or len(conv.inputs[0].inputs) != 1:
        return 0
    b = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(w.shape[0], w.dtype)
    group = conv.attrs.get("group", 1)
    if b.shape != (w.shape[0],) or not isinstance(group, int) or not _valid_group(w.shape, group):
        return 0  # an invalid Conv: onnxruntime says so when it loads the model
    in_channels = w.shape[1] * group
    # the per-input-channel value of each weight w[o, j], as an array shaped like w
    channels = input_channels(w.shape, group)

    def per_weight(values: np.ndarray) -> np.ndarray:
        return values[channels].reshape(channels.shape + (1,) * (w.ndim - 2))

    def constant_op(t: gs.Tensor, op: str):
        """(node, data input, per-channel values) when ``t`` is ``op(data, constant)`` read by one
        node only, and the data input already has the Conv's input shape (a constant that
        broadcasts it to more channels makes them, and cannot move into the weights)."""
        found = _reader_constant(t.inputs[0], t, op, graph_outputs) if len(t.inputs) == 1 else None
        if found is None or not _has_channels(found[0], in_channels, w.ndim):
            return None
        values = per_channel_values(np.asarray(found[1].values), in_channels, w.ndim)
        return (t.inputs[0], found[0], values) if values is not None and np.isfinite(values).all() else None

    x = conv.inputs[0]
    add = constant_op(x, "Add")
    mul = constant_op(add[1] if add is not None else x, "Mul")
    fold_add = add is not None and _unpadded(conv)
    new_shift = None
    if mul is not None and add is not None and not fold_add:  # padded: h * c + b = (h + b / c) * c
        with np.errstate(all="ignore"):
            new_shift = (add[2] / mul[2]).astype(np.float32)
        if not np.isfinite(new_shift).all():
            mul = None  # b / c does not fit float32 (or c is 0): the pair stays as it is
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    if fold_add:
        b64 = b64 + (w64 * per_weight(add[2])).reshape(w.shape[0], -1).sum(1)
    if mul is not None:
        w64 = w64 * per_weight(mul[2])
    folded = int(fold_add) + int(mul is not None)
    w_new, b_new = w64.astype(w.dtype), b64.astype(w.dtype)
    if not folded or not (np.isfinite(w_new).all() and np.isfinite(b_new).all()):
        return 0
    # everything is known: now edit the graph
    if fold_add:
        conv.inputs[0] = add[1]
    if mul is not None:
        if new_shift is not None:
            shape = (1, in_channels) + (1,) * (w.ndim - 2)
            add[0].inputs = [mul[1], gs.Constant(ctx.unique_name(f"{add[0].name}_shift"), new_shift.reshape(shape))]
        else:
            conv.inputs[0] = mul[1]
    _set_weights(conv, w_new, b_new, ctx)
    return folded


@compiler_pass("fold-affine", requires=(CONSTANT_WEIGHTS, BATCHNORMS_FOLDED, TENSOR_TYPES), produces=(AFFINE_FOLDED,),
               effect=GraphEffect.REWRITES)
def fold_affine(graph: gs.Graph, ctx: CompileContext) -> None:
    """Constant Add/Sub/Mul after a Conv, and a constant scale (and shift, unpadded) before one, fold into it."""
    graph_outputs = {t.name for t in graph.outputs}
    folded = 0
    convs = [
        node
        for node in graph.nodes
        if node.op == "Conv"
        and isinstance(node.inputs[1], gs.Constant)
        and (len(node.inputs) < 3 or isinstance(node.inputs[2], gs.Constant))
    ]
    for conv in convs:
        while _fold_one(conv, graph_outputs, ctx):  # a bias Add, then a scale, then a shift
            folded += 1
    for conv in convs:
        folded += _fold_into_reader(conv, graph_outputs, ctx)
    graph.cleanup()
    ctx.count(affine_ops_folded=folded)
    ctx.facts[AFFINE_FOLDED] = True

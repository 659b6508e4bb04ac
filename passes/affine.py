"""fold-affine: a Mul or Add by a constant right after a Conv folds into the Conv's weights and
bias, so that the Conv and its integer kernel compute it.

paddle2onnx exports a Conv's bias as a separate ``Add(conv, Reshape(bias))``, and PP-LCNet-style
models put learnable affine blocks (a scalar scale and shift) after Convs. onnxruntime fuses such
an Add into the Conv in a float model, but not across QuantizeLinear/DequantizeLinear: each
would run as a float op between two integer kernels (52 of them in PP-OCRv5's detector).

    conv(x, W) * m + a = conv(x, W * m) + (b * m + a)      m, a: a scalar or one value per output channel

Sub by a constant is an Add of its negation. Div is left alone: multiplying by 1/d rounds
differently.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import AFFINE_FOLDED, BATCHNORMS_FOLDED, CONSTANT_WEIGHTS
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
    if w_new is not w:
        conv.inputs[1] = gs.Constant(ctx.unique_name(conv.inputs[1].name + "_affine"), w_new)
    bias = gs.Constant(ctx.unique_name(f"{conv.name}_bias_affine"), b_new)
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias
    else:
        conv.inputs.append(bias)
    # the Conv now writes the op's output; the op is left without inputs and outputs
    result = consumer.outputs[0]
    consumer.outputs.clear()
    consumer.inputs.clear()
    conv.outputs[0] = result
    return True


@compiler_pass("fold-affine", requires=(CONSTANT_WEIGHTS, BATCHNORMS_FOLDED), produces=(AFFINE_FOLDED,),
               effect=GraphEffect.REWRITES)
def fold_affine(graph: gs.Graph, ctx: CompileContext) -> None:
    """Add, Sub and Mul by a per-channel or scalar constant after a Conv fold into its weights and bias."""
    graph_outputs = {t.name for t in graph.outputs}
    folded = 0
    for conv in list(graph.nodes):
        if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant):
            continue
        if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
            continue
        while _fold_one(conv, graph_outputs, ctx):  # a bias Add, then a scale, then a shift
            folded += 1
    graph.cleanup()
    ctx.count(affine_ops_folded=folded)
    ctx.facts[AFFINE_FOLDED] = True

"""quantize-weights: every selected layer's weight becomes an int8 initializer read through a
DequantizeLinear (zero point 0; per-channel scales along the output-channel axis).

Values use ``2^(k-1) - 1`` levels each side for k = ``--wbits`` (7 for 8-bit weights in reduced
range, see ``CompileConfig.reduce_range``), stored in int8 whatever k is.
The report's weight SQNR compares the original weight with the weight the quantized layer
effectively applies (split pieces summed back), and with plain quantization without OCS.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext, LayerPlan
from ocs_onnx.pass_manager import Pass
from ocs_onnx.quant import (
    dequantize,
    fake_quantize_symmetric,
    merge_split_channels,
    quantize_symmetric,
    sqnr_db,
    symmetric_scale,
)

from .clip_weights import clip_thresholds, scale_axis


def _record_sqnr(plan: LayerPlan, q: np.ndarray, axis: int | None, ctx: CompileContext) -> None:
    """SQNR of the layer's effective weight, and of the same clip method without OCS."""
    bits = ctx.config.weight_bits
    w0 = plan.original_weight
    plan.weight_energy = float(np.sum(np.square(w0, dtype=np.float64)))
    plain_scale = symmetric_scale(clip_thresholds(w0, axis, ctx.config), bits)
    plan.sqnr_without_ocs_db = sqnr_db(w0, fake_quantize_symmetric(w0, plain_scale, bits, axis))
    effective = dequantize(q, plan.scale, axis)
    if plan.splits:
        effective = merge_split_channels(
            effective, plan.weight_in_axis, plan.channel_origins, w0.shape[plan.weight_in_axis]
        )
    plan.sqnr_with_ocs_db = sqnr_db(w0, effective)


def _dequantize_node(ctx: CompileContext, plan: LayerPlan, q: np.ndarray, axis: int | None) -> gs.Node:
    base = plan.weight.name
    scale = np.asarray(plan.scale, dtype=np.float32)
    inputs = [
        gs.Constant(ctx.unique_name(f"{base}_int8"), q.astype(np.int8)),
        gs.Constant(ctx.unique_name(f"{base}_scale"), scale),
        gs.Constant(ctx.unique_name(f"{base}_zero_point"), np.zeros(scale.shape, dtype=np.int8)),
    ]
    out = gs.Variable(ctx.unique_name(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": axis} if axis is not None else {}
    return gs.Node("DequantizeLinear", ctx.unique_name(f"{plan.name}_weight_dequantize"), attrs, inputs, [out])


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    bits = ctx.config.weight_bits
    done: dict[int, gs.Node] = {}  # a weight shared by several layers is quantized once
    for plan in ctx.layers:
        axis = scale_axis(plan, ctx.config.granularity)
        q = quantize_symmetric(plan.weight.values, plan.scale, bits, axis)
        _record_sqnr(plan, q, axis, ctx)
        key = id(plan.weight)
        if key not in done:
            done[key] = _dequantize_node(ctx, plan, q, axis)
        plan.node.inputs[1] = done[key].outputs[0]
        ctx.done_with(plan.original_weight)
    graph.nodes.extend(done.values())


PASS = Pass("quantize-weights", "store weights as int8 + DequantizeLinear (symmetric, zero point 0)", run)

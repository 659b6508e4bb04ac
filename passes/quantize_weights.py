"""quantize-weights: every selected layer's weight becomes an int8 initializer read through a
DequantizeLinear (zero point 0; per-channel scales along the output-channel axis).

Values use ``2^(k-1) - 1`` levels each side for k = ``--wbits`` (7 for 8-bit weights in reduced
range, see ``CompileConfig.reduce_range``), stored in int8 whatever k is.
The report's weight SQNR compares the original weight with the weight the quantized layer
effectively applies (split pieces summed back), and with plain quantization without OCS (the
scale clip-weights would give the unsplit weight).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    ACTIVATION_SPLITS,
    ACTIVATION_STATISTICS,
    LAYERS,
    QA_WEIGHT_OFFSETS,
    QUANTIZED_WEIGHTS,
    WEIGHT_QUALITY,
    WEIGHT_SCALES,
    WEIGHT_LEVELS,
    WEIGHT_SPLITS,
    WeightQuality,
    WeightScale,
    Layer,
    WeightSplit,
)
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.quant import (
    dequantize,
    fake_quantize_symmetric,
    merge_split_channels,
    quantize_symmetric,
    sqnr_db,
    symmetric_scale,
)
from ocs_onnx.weights import clip_thresholds, scale_axis, without_copies

from .clip_weights import raised_scale


def weight_quality(
    layer: Layer, split: WeightSplit, scale: WeightScale, q: np.ndarray, axis: int | None, ctx: CompileContext
) -> WeightQuality:
    """SQNR of the layer's effective weight, and of the same clip method without OCS (its scale
    raised as clip-weights would raise it for the unsplit weight)."""
    bits, in_axis, split_out_axis = ctx.config.weight_bits, layer.weight_in_axis, layer.weight_out_axis
    w0 = split.unsplit
    plain_scale = symmetric_scale(clip_thresholds(w0, axis, ctx.config), bits)
    x_qparams = ctx.facts[ACTIVATION_QPARAMS].get(layer.node.inputs[0].name)
    plain_scale = raised_scale(layer, w0, list(range(w0.shape[in_axis])), plain_scale, x_qparams, ctx)[0]
    without_ocs = sqnr_db(w0, fake_quantize_symmetric(w0, plain_scale, bits, axis))
    effective = without_copies(dequantize(q, scale.scale, axis), split_out_axis, split.out_copies)
    if split.splits:
        effective = merge_split_channels(effective, in_axis, split.channel_origins, w0.shape[in_axis])
    return WeightQuality(float(np.sum(np.square(w0, dtype=np.float64))), without_ocs, sqnr_db(w0, effective))


def _dequantize_node(
    ctx: CompileContext, layer_name: str, weight: gs.Constant, scale: np.ndarray, q: np.ndarray, axis: int | None
) -> gs.Node:
    base = weight.name
    scale = np.asarray(scale, dtype=np.float32)
    inputs = [
        gs.Constant(ctx.unique_name(f"{base}_int8"), q.astype(np.int8)),
        gs.Constant(ctx.unique_name(f"{base}_scale"), scale),
        gs.Constant(ctx.unique_name(f"{base}_zero_point"), np.zeros(scale.shape, dtype=np.int8)),
    ]
    out = gs.Variable(ctx.unique_name(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": axis} if axis is not None else {}
    return gs.Node("DequantizeLinear", ctx.unique_name(f"{layer_name}_weight_dequantize"), attrs, inputs, [out])


@compiler_pass(
    "quantize-weights",
    requires=(LAYERS, WEIGHT_SPLITS, WEIGHT_SCALES, QA_WEIGHT_OFFSETS, WEIGHT_LEVELS, ACTIVATION_QPARAMS,
              ACTIVATION_PLAN, ACTIVATION_STATISTICS, ACTIVATION_SPLITS),  # fmt: skip
    produces=(QUANTIZED_WEIGHTS, WEIGHT_QUALITY),
    effect=GraphEffect.EDITS,
)
def quantize_weights(graph: gs.Graph, ctx: CompileContext) -> None:
    """Int8 initializers + DequantizeLinear, zero point 0, round half up (or round-weights' levels)."""
    bits = ctx.config.weight_bits
    splits, scales = ctx.facts[WEIGHT_SPLITS].layers, ctx.facts[WEIGHT_SCALES]
    quality = {}
    done: dict[int, gs.Node] = {}  # a weight shared by several layers is quantized once
    for layer in ctx.facts[LAYERS]:
        split, scale = splits[layer.name], scales[layer.name]
        axis = scale_axis(layer, ctx.config.granularity)
        chosen = ctx.facts[WEIGHT_LEVELS].get(layer.name)
        if chosen is not None and chosen.levels is not None:
            q = chosen.levels  # round-weights chose them from the layer's inputs
        else:
            q = quantize_symmetric(split.constant.values, scale.scale, bits, axis)
        quality[layer.name] = weight_quality(layer, split, scale, q, axis, ctx)
        key = id(split.constant)
        if key not in done:
            done[key] = _dequantize_node(ctx, layer.name, split.constant, scale.scale, q, axis)
        layer.node.inputs[1] = done[key].outputs[0]
        ctx.done_with(split.unsplit)
    graph.nodes.extend(done.values())
    ctx.facts[WEIGHT_QUALITY] = quality
    ctx.facts[QUANTIZED_WEIGHTS] = True

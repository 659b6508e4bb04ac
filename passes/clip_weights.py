"""clip-weights: the clip threshold and quantization scale of every selected layer's weight,
found on the weights as they are after splitting (OCS + clip, paper sec. 5.2-5.3): OCS has
already shrunk the range, the clip method then trades the remaining outliers against rounding.

alpha = the ``--wclip`` threshold (max|w| for ``none``), per tensor or per output channel
(``--granularity``); scale = alpha / (2^(k-1) - 1).

A layer's int32 bias has scale input scale x weight scale. Where a channel's weights are tiny
and its bias is not (a pruned BatchNorm channel: gamma ~ 0, beta = 1), that bias does not fit
in int32, and onnxruntime's fused kernels ignore a bias left float. So the weight scale of such
a channel is raised until its bias fits in 2^30 levels (half of int32, so that the accumulator
keeps room for the products): its weights, negligible next to its bias, get a coarser grid.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
import numpy as np

from ocs_onnx.facts import ACTIVATION_QPARAMS, LAYERS, WEIGHT_SCALES, WEIGHT_SPLITS, Layer, WeightScale
from ocs_onnx.pass_manager import compiler_pass
from ocs_onnx.quant import max_abs, symmetric_scale
from ocs_onnx.weights import clip_thresholds, scale_axis, with_copies, without_copies


# Levels an int32 bias may use: half the int32 range, the other half left to the accumulator.
BIAS_LEVEL_LIMIT = 2**30


def bias_scale_floor(bias: np.ndarray, input_scale: float, per_channel: bool) -> np.ndarray:
    """The smallest weight scale (per channel, or one for the tensor) at which ``bias`` fits in
    BIAS_LEVEL_LIMIT levels of input scale x weight scale."""
    floor = np.abs(bias.astype(np.float64)) / (float(input_scale) * BIAS_LEVEL_LIMIT)
    return floor if per_channel else np.asarray(floor.max(initial=0.0))


def _float_bias(layer: Layer, out_channels: int) -> np.ndarray | None:
    """The layer's constant float32 bias of one value per output channel (what becomes int32)."""
    node = layer.node
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return None
    bias = node.inputs[2].values
    return bias if bias.dtype == np.float32 and bias.shape == (out_channels,) else None


@compiler_pass("clip-weights", requires=(LAYERS, WEIGHT_SPLITS, ACTIVATION_QPARAMS), produces=(WEIGHT_SCALES,))
def clip_weights(graph: gs.Graph, ctx: CompileContext) -> None:
    """Clip threshold alpha (`--wclip`; max abs for `none`) on the split weights, `scale = alpha
    / (2^(k-1)-1)`, per tensor or per output channel; raised where an int32 bias would not fit."""
    splits, qparams = ctx.facts[WEIGHT_SPLITS].layers, ctx.facts[ACTIVATION_QPARAMS]
    scales = {}
    for layer in ctx.facts[LAYERS]:
        axis = scale_axis(layer, ctx.config.granularity)
        split = splits[layer.name]
        w = split.constant.values  # computed from the unsplit weight for a split layer: read once
        out_channels = w.shape[layer.weight_out_axis]
        # Rows the layer computes twice (for a split layer after it) get their original's
        # threshold: the numbers are those the layer would get without them.
        w = without_copies(w, layer.weight_out_axis, split.out_copies)
        threshold = with_copies(clip_thresholds(w, axis, ctx.config), split.out_copies)
        peak = with_copies(max_abs(w, axis), split.out_copies)
        scale = symmetric_scale(threshold, ctx.config.weight_bits)
        raised = 0
        bias, x = _float_bias(layer, out_channels), layer.node.inputs[0].name
        if bias is not None and x in qparams:
            floor = bias_scale_floor(bias, qparams[x].scale, per_channel=axis is not None)
            raised = int(np.count_nonzero(floor > scale))
            scale = np.maximum(scale, floor).astype(scale.dtype) if raised else scale
        scales[layer.name] = WeightScale(peak, threshold, scale, raised)
        ctx.done_with(split.unsplit)
    ctx.facts[WEIGHT_SCALES] = scales

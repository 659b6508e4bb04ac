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

At W8A8 a row's scale is also raised where onnxruntime's 16-bit pair sums could overflow on
CPUs without VNNI, just enough that they provably cannot on the calibration data
(``ocs_onnx/overflow.py``); ``--reduce-range`` puts every row on the +-63 grid instead.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
import numpy as np

from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    ACTIVATION_SPLITS,
    ACTIVATION_STATISTICS,
    LAYERS,
    WEIGHT_SCALES,
    WEIGHT_SPLITS,
    Layer,
    WeightScale,
)
from ocs_onnx.overflow import layer_overflow_safe_scale
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


def input_channel_maxima(layer: Layer, origins: list[int], ctx: CompileContext) -> np.ndarray | None:
    """The calibrated maximum of every channel the layer's split weight multiplies (``origins``:
    the original channel of each), as its input is after activation and weight OCS (a copy has
    its original's maximum; a halved channel is bounded by its whole one). None where
    calibration has none for this layout."""
    entry = ctx.facts[ACTIVATION_PLAN].channel_peak_inputs.get(layer.name)
    maxima = ctx.facts[ACTIVATION_STATISTICS].channel_peaks.get(entry[0]) if entry else None
    if maxima is None:
        return None
    copied = ctx.facts[ACTIVATION_SPLITS].copied_channels.get(layer.name, [])
    maxima = np.concatenate([maxima, maxima[copied]]) if copied else maxima
    origins = np.asarray(origins)
    return maxima[origins] if origins.size and origins.max() < maxima.size else None


def conv_group(layer: Layer) -> int:
    return int(layer.node.attrs.get("group", 1)) if layer.op == "Conv" else 1


def raised_scale(
    layer: Layer, w: np.ndarray, origins: list[int], scale: np.ndarray, qparams, ctx: CompileContext
) -> tuple[np.ndarray, int, int]:
    """``scale`` of the layer's (split) weight ``w`` raised where its int32 bias would not fit
    and, at W8A8, where its 8-bit kernel could overflow its 16-bit pair sums; with the number
    of rows raised for each. ``origins``: the original channel of each input channel of ``w``;
    ``qparams``: its input's parameters (None: the input stays float, no integer kernel)."""
    if qparams is None:
        return scale, 0, 0
    raised_for_bias = raised_for_overflow = 0
    bias = _float_bias(layer, w.shape[layer.weight_out_axis])
    if bias is not None:
        floor = bias_scale_floor(bias, qparams.scale, per_channel=np.ndim(scale) > 0)
        raised_for_bias = int(np.count_nonzero(floor > scale))
        scale = np.maximum(scale, floor).astype(scale.dtype) if raised_for_bias else scale
    if ctx.config.bounds_pair_sums:
        maxima = input_channel_maxima(layer, origins, ctx) if len(origins) == w.shape[layer.weight_in_axis] else None
        safe = layer_overflow_safe_scale(
            w, layer.weight_in_axis, layer.weight_out_axis, conv_group(layer), scale, qparams, maxima
        )
        raised_for_overflow = int(np.count_nonzero(np.atleast_1d(safe > scale)))
        scale = safe
    return scale, raised_for_bias, raised_for_overflow


@compiler_pass(
    "clip-weights",
    requires=(LAYERS, WEIGHT_SPLITS, ACTIVATION_QPARAMS, ACTIVATION_PLAN, ACTIVATION_STATISTICS, ACTIVATION_SPLITS),
    produces=(WEIGHT_SCALES,),
)
def clip_weights(graph: gs.Graph, ctx: CompileContext) -> None:
    """Clip threshold alpha (`--wclip`; max abs for `none`) on the split weights, `scale = alpha
    / (2^(k-1)-1)`, per tensor or per output channel; raised where an int32 bias would not fit,
    and at W8A8 where 8-bit kernels' 16-bit pair sums could overflow."""
    splits, qparams = ctx.facts[WEIGHT_SPLITS].layers, ctx.facts[ACTIVATION_QPARAMS]
    scales = {}
    for layer in ctx.facts[LAYERS]:
        axis = scale_axis(layer, ctx.config.granularity)
        split = splits[layer.name]
        full = split.constant.values  # computed from the unsplit weight for a split layer: read once
        # Rows the layer computes twice (for a split layer after it) get their original's
        # threshold: the numbers are those the layer would get without them.
        w = without_copies(full, layer.weight_out_axis, split.out_copies)
        threshold = with_copies(clip_thresholds(w, axis, ctx.config), split.out_copies)
        peak = with_copies(max_abs(w, axis), split.out_copies)
        scale = symmetric_scale(threshold, ctx.config.weight_bits)
        x_qparams = qparams.get(layer.node.inputs[0].name)
        scale, raised, raised_for_overflow = raised_scale(layer, full, split.channel_origins, scale, x_qparams, ctx)
        scales[layer.name] = WeightScale(peak, threshold, scale, raised, raised_for_overflow)
        ctx.done_with(split.unsplit)
    ctx.facts[WEIGHT_SCALES] = scales

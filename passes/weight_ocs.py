"""weight-ocs: Outlier Channel Splitting of weights (paper sec. 3.2-3.4).

For each splittable layer with C input channels, ceil(ratio * C) times: take the input channel
that holds the largest |w|, halve it and append the other half as a new input channel. The
layer's input gets the same channels appended, so the layer computes

    y = sum_i x_i * W_i  =  ... + x_c * W_c/2 + x_c * W_c/2

The widened input is ``Concat(x, Slice(x, c1), ...)`` (see ``channels.py`` for why). Layers that
read the same tensor and duplicate the same channels share these nodes.

A layer keeps its splits only if they lower its weight quantization error (the squared error of
the weight the quantized layer effectively applies, at the configured bits, granularity and clip
method): where the largest weights of a layer are all about the same size, halving one channel
barely moves the grid and only adds rounding, and the extra channels would cost for nothing.
``--no-ocs-guard`` splits regardless, as the paper does.

This pass writes the *naive* halves; the quantization-aware offsets (paper eq. 6) need the final
scale and are applied by ``qa-split`` once ``clip-weights`` has chosen it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.channels import append_channel_copies
from ocs_onnx.config import CompileConfig
from ocs_onnx.context import CompileContext
from ocs_onnx.facts import ACTIVATION_SPLITS, LAYERS, WEIGHT_SPLITS, Layer, WeightSplit, WeightSplits
from ocs_onnx.gs_adapter import ComputedConstant
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.quant import (
    apply_channel_splits,
    channel_origins,
    dequantize,
    merge_split_channels,
    plan_channel_splits,
    quantize_symmetric,
    split_count,
    symmetric_scale,
)
from ocs_onnx.weights import clip_thresholds, scale_axis, split_values


def _widen_input(
    ctx: CompileContext, node: gs.Node, x: gs.Variable, axis: int, copies: list[int], widened_inputs: dict[str, str]
) -> tuple[list[gs.Node], gs.Variable]:
    """Appends the copied channels to the layer's input. The copies hold a subset of x's values:
    they are quantized with x's parameters (``widened_inputs``), so onnxruntime moves them as
    8-bit data."""
    nodes, slices, widened = append_channel_copies(ctx, f"{node.name}_ocs", x, axis, copies)
    for tensor in (*slices, widened):
        widened_inputs[tensor.name] = x.name
    return nodes, widened


def quantization_error(layer: Layer, w0: np.ndarray, splits: list[int], config: CompileConfig) -> float:
    """Squared error of the weight the layer effectively applies after splitting ``w0`` by
    ``splits``, clipping, (QA) splitting with the final scale, and quantizing: the pipeline's
    own steps."""
    in_axis = layer.weight_in_axis
    axis = scale_axis(layer, config.granularity)
    naive = apply_channel_splits(w0, in_axis, splits)
    scale = symmetric_scale(clip_thresholds(naive, axis, config), config.weight_bits)
    split = apply_channel_splits(w0, in_axis, splits, qa_scale=scale, out_axis=axis) if config.split == "qa" else naive
    effective = dequantize(quantize_symmetric(split, scale, config.weight_bits, axis), scale, axis)
    merged = merge_split_channels(effective, in_axis, channel_origins(w0.shape[in_axis], splits), w0.shape[in_axis])
    return float(np.sum((w0.astype(np.float64) - merged) ** 2))


def _split_layer(
    layer: Layer, weight: gs.Constant, ctx: CompileContext, shared: dict, widened_inputs: dict[str, str]
) -> WeightSplit:
    w = weight.values
    channels = w.shape[layer.weight_in_axis]
    splits = plan_channel_splits(w, layer.weight_in_axis, split_count(ctx.config.ratio, channels))
    reason = None
    if splits and ctx.config.ocs_guard:
        with_ocs = quantization_error(layer, w, splits, ctx.config)
        without = quantization_error(layer, w, [], ctx.config)
        if not with_ocs < without:
            reason = "splitting did not lower this layer's weight quantization error"
            splits = []
    ctx.done_with(w)
    origins = channel_origins(channels, splits)
    if not splits:
        return WeightSplit(w, weight, [], origins, reason)
    node = layer.node
    split_weight = ComputedConstant(
        ctx.unique_name(f"{weight.name}_ocs"), split_values(w, layer.weight_in_axis, splits)
    )
    node.inputs[1] = split_weight

    x = node.inputs[0]
    copies = origins[channels:]
    key = (x.name, layer.input_channel_axis, tuple(copies))
    if key not in shared:
        shared[key] = _widen_input(ctx, node, x, layer.input_channel_axis, copies, widened_inputs)
    node.inputs[0] = shared[key][1]
    return WeightSplit(w, split_weight, splits, origins, None)


# after activation OCS: weight OCS splits the widened weight the layer will run with
@compiler_pass("weight-ocs", requires=(LAYERS, ACTIVATION_SPLITS), produces=(WEIGHT_SPLITS,), effect=GraphEffect.EDITS)
def weight_ocs(graph: gs.Graph, ctx: CompileContext) -> None:
    """`ceil(r*C_in)` splits per layer on the input channel holding the largest abs weight, kept
    if they lower the weight quantization error; weight rows duplicated, input widened with
    `Concat(x, Slice(x, c), ...)`."""
    activation_splits = ctx.facts[ACTIVATION_SPLITS]
    shared: dict = {}
    widened_inputs: dict[str, str] = {}
    layers: dict[str, WeightSplit] = {}
    for layer in ctx.facts[LAYERS]:
        weight = activation_splits.weight_of(layer)
        if layer.splittable and ctx.config.ratio > 0:
            layers[layer.name] = _split_layer(layer, weight, ctx, shared, widened_inputs)
        else:
            w = weight.values
            origins = channel_origins(w.shape[layer.weight_in_axis], [])
            layers[layer.name] = WeightSplit(w, weight, [], origins, layer.split_refused)
    for nodes, _ in shared.values():
        graph.nodes.extend(nodes)
    ctx.facts[WEIGHT_SPLITS] = WeightSplits(layers, widened_inputs)

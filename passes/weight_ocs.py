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

from ocs_onnx.context import CompileContext, LayerPlan
from ocs_onnx.model_io import ComputedConstant, ComputedValues
from ocs_onnx.pass_manager import Pass
from ocs_onnx.config import CompileConfig
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

from .channels import append_channel_copies
from .clip_weights import clip_thresholds, scale_axis


def _widen_input(
    ctx: CompileContext, node: gs.Node, x: gs.Variable, axis: int, copies: list[int]
) -> tuple[list[gs.Node], gs.Variable]:
    """Appends the copied channels to the layer's input. The copies hold a subset of x's values:
    they are quantized with x's parameters, so onnxruntime moves them as 8-bit data."""
    nodes, slices, widened = append_channel_copies(ctx, f"{node.name}_ocs", x, axis, copies)
    for tensor in (*slices, widened):
        ctx.ocs_duplicates[tensor.name] = x.name
        if x.name in ctx.activations:
            ctx.activations[tensor.name] = ctx.activations[x.name]
    return nodes, widened


def split_values(plan: LayerPlan, qa_scale: np.ndarray | None = None, out_axis: int | None = None) -> ComputedValues:
    """The layer's weight after its splits (naive halves, or quantization-aware pieces with
    ``qa_scale``), computed from the original weight whenever it is read."""
    w, in_axis, splits = plan.original_weight, plan.weight_in_axis, list(plan.splits)
    shape = list(w.shape)
    shape[in_axis] += len(splits)
    return ComputedValues(
        lambda: apply_channel_splits(w, in_axis, splits, qa_scale=qa_scale, out_axis=out_axis), shape, w.dtype
    )


def quantization_error(plan: LayerPlan, splits: list[int], config: CompileConfig) -> float:
    """Squared error of the weight the layer effectively applies after splitting by ``splits``,
    clipping, (QA) splitting with the final scale, and quantizing: the pipeline's own steps."""
    w0, in_axis = plan.original_weight, plan.weight_in_axis
    axis = scale_axis(plan, config.granularity)
    naive = apply_channel_splits(w0, in_axis, splits)
    scale = symmetric_scale(clip_thresholds(naive, axis, config), config.weight_bits)
    split = apply_channel_splits(w0, in_axis, splits, qa_scale=scale, out_axis=axis) if config.split == "qa" else naive
    effective = dequantize(quantize_symmetric(split, scale, config.weight_bits, axis), scale, axis)
    merged = merge_split_channels(effective, in_axis, channel_origins(w0.shape[in_axis], splits), w0.shape[in_axis])
    return float(np.sum((w0.astype(np.float64) - merged) ** 2))


def _split_layer(plan: LayerPlan, ratio: float, ctx: CompileContext, shared: dict) -> None:
    w = plan.original_weight
    channels = w.shape[plan.weight_in_axis]
    splits = plan_channel_splits(w, plan.weight_in_axis, split_count(ratio, channels))
    if splits and ctx.config.ocs_guard:
        with_ocs, without = quantization_error(plan, splits, ctx.config), quantization_error(plan, [], ctx.config)
        if not with_ocs < without:
            plan.not_split_reason = "splitting did not lower this layer's weight quantization error"
            splits = []
    ctx.done_with(w)
    plan.splits = splits
    plan.channel_origins = channel_origins(channels, plan.splits)
    if not plan.splits:
        return
    node = plan.node
    split_weight = ComputedConstant(ctx.unique_name(f"{plan.weight.name}_ocs"), split_values(plan))
    node.inputs[1] = split_weight
    plan.weight = split_weight

    x = node.inputs[0]
    copies = plan.channel_origins[channels:]
    key = (x.name, plan.input_channel_axis, tuple(copies))
    if key not in shared:
        shared[key] = _widen_input(ctx, node, x, plan.input_channel_axis, copies)
    node.inputs[0] = shared[key][1]


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    shared: dict = {}
    for plan in ctx.layers:
        if plan.splittable and ctx.config.ratio > 0:
            _split_layer(plan, ctx.config.ratio, ctx, shared)
    for nodes, _ in shared.values():
        graph.nodes.extend(nodes)


PASS = Pass(
    "weight-ocs",
    "split the input channels holding the largest |w| (duplicated weight rows, input channels appended)",
    run,
)

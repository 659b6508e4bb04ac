"""weight-ocs: Outlier Channel Splitting of weights (paper sec. 3.2-3.4).

For each splittable layer with C input channels, ceil(ratio * C) times: take the input channel
that holds the largest |w|, halve it and append the other half as a new input channel. The
layer's input gets the same channels appended, so the layer computes

    y = sum_i x_i * W_i  =  ... + x_c * W_c/2 + x_c * W_c/2

The widened input is ``Concat(x, Slice(x, c1), Slice(x, c2), ...)`` on the channel axis rather
than one Gather of every channel: on the last axis (MatMul, Gemm) onnxruntime's Gather copies
value by value, and a full Gather made a quantized 256-wide MatMul 1.6x slower, where a Concat
(QLinearConcat once quantized) of small copies cost about 2 %. Slices rather than one Gather of
the copied channels because onnxruntime's layout optimizer moves Slice and Concat into NHWC
with QLinearConv, where a Gather leaves a Transpose pair around every split Conv. Layers that
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

from .clip_weights import clip_thresholds, scale_axis


def _shape_with(x: gs.Variable, axis: int, channels) -> list | None:
    """x's shape with the channel axis resized (None where unknown)."""
    if x.shape is None:
        return None
    shape = list(x.shape)
    shape[axis] = channels if isinstance(channels, int) else None
    return shape


def _widen_input(
    ctx: CompileContext, node: gs.Node, x: gs.Variable, axis: int, copies: list[int]
) -> tuple[list[gs.Node], gs.Variable]:
    """Nodes computing Concat(x, x[c1], x[c2], ...) along ``axis`` (one Slice per copied
    channel, reused when a channel is copied twice), and their output."""
    known = x.shape[axis] if x.shape is not None else None
    widened_channels = known + len(copies) if isinstance(known, int) else None
    axes = gs.Constant(ctx.unique_name(f"{node.name}_ocs_axes"), np.asarray([axis], dtype=np.int64))
    nodes, slices = [], {}
    for channel in dict.fromkeys(copies):  # distinct, in order of first use
        out = gs.Variable(ctx.unique_name(f"{x.name}_channel{channel}"), dtype=x.dtype, shape=_shape_with(x, axis, 1))
        bounds = [
            gs.Constant(ctx.unique_name(f"{out.name}_{edge}"), np.asarray([value], dtype=np.int64))
            for edge, value in (("start", channel), ("end", channel + 1))
        ]
        nodes.append(
            gs.Node(
                "Slice", ctx.unique_name(f"{node.name}_ocs_slice{channel}"), inputs=[x, *bounds, axes], outputs=[out]
            )
        )
        ctx.ocs_duplicates[out.name] = x.name
        slices[channel] = out
    widened = gs.Variable(ctx.unique_name(f"{x.name}_ocs"), dtype=x.dtype, shape=_shape_with(x, axis, widened_channels))
    nodes.append(
        gs.Node(
            "Concat",
            ctx.unique_name(f"{node.name}_ocs_concat"),
            attrs={"axis": axis},
            inputs=[x] + [slices[c] for c in copies],
            outputs=[widened],
        )
    )
    ctx.ocs_duplicates[widened.name] = x.name
    return nodes, widened


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
    plan.splits = splits
    plan.channel_origins = channel_origins(channels, plan.splits)
    if not plan.splits:
        return
    node = plan.node
    split_weight = gs.Constant(
        ctx.unique_name(f"{plan.weight.name}_ocs"), apply_channel_splits(w, plan.weight_in_axis, plan.splits)
    )
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

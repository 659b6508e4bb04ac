"""weight-ocs: Outlier Channel Splitting of weights (paper sec. 3.2-3.4).

For each splittable layer with C input channels, ceil(ratio * C) times: take the input channel
that holds the largest |w|, halve it and append the other half as a new input channel. The
layer's input gets the same channels appended, so the layer computes

    y = sum_i x_i * W_i  =  ... + x_c * W_c/2 + x_c * W_c/2

Where x is computed from a Conv/Gemm/MatMul through per-channel ops that nothing else reads, that
producer computes the copies itself: its output rows for them are duplicated
(``ocs_onnx/widening.py``). Elsewhere the widened input is ``Concat(x, Slice(x, c1), ...)`` at
run time (see ``ocs_onnx/channels.py`` for why that form). Layers that read the same tensor and
duplicate the same channels share one widening.

A layer keeps its splits only if they lower its weight quantization error (the squared error of
the weight the quantized layer effectively applies, at the configured bits, granularity and clip
method), and raise its estimated output SQNR by at least ``--min-split-gain`` dB. The output's
noise is the weight's relative error plus its input's (the input's quantization SQNR estimated on
its calibration histogram under the parameters ``clip-activations`` will give it): for
y = sum_i w_i x_i with errors uncorrelated with the signal, the two relative noise powers add.
So a split that refines a 7-bit weight grid behind an 8-bit input whose own noise is as large
gains little, and the extra channels cost run time for it; where the largest weights of a layer
are all about the same size, halving one channel barely moves the grid at all.
``--no-ocs-guard`` splits regardless, as the paper does.

This pass writes the *naive* halves; the quantization-aware offsets (paper eq. 6) need the final
scale and are applied by ``qa-split`` once ``clip-weights`` has chosen it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.activations import ClippedActivation, clipped_activation
from ocs_onnx.channels import append_channel_copies
from ocs_onnx.config import CompileConfig
from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_SPLITS,
    ACTIVATION_STATISTICS,
    LAYERS,
    WEIGHT_SPLITS,
    Layer,
    WeightSplit,
    WeightSplits,
    observed,
)
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
from ocs_onnx.widening import find_region, widen

from .clip_weights import raised_scale


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


def quantization_error(
    layer: Layer, w0: np.ndarray, splits: list[int], config: CompileConfig, fit_scale: ScaleFit | None = None
) -> float:
    """Squared error of the weight the layer effectively applies after splitting ``w0`` by
    ``splits``, clipping, (QA) splitting with the final scale, and quantizing: the pipeline's
    own steps. ``fit_scale`` raises the scale as ``clip-weights`` will (for the kernels'
    overflow bound too, which a split can tighten: a copy may pair with its original)."""
    in_axis = layer.weight_in_axis
    axis = scale_axis(layer, config.granularity)
    origins = channel_origins(w0.shape[in_axis], splits)
    naive = apply_channel_splits(w0, in_axis, splits)
    scale = symmetric_scale(clip_thresholds(naive, axis, config), config.weight_bits)
    if fit_scale is not None:
        scale = fit_scale(naive, origins, scale)
    split = apply_channel_splits(w0, in_axis, splits, qa_scale=scale, out_axis=axis) if config.split == "qa" else naive
    effective = dequantize(quantize_symmetric(split, scale, config.weight_bits, axis), scale, axis)
    merged = merge_split_channels(effective, in_axis, origins, w0.shape[in_axis])
    return float(np.sum((w0.astype(np.float64) - merged) ** 2))


# (split weight, the original channel of each of its input channels, scale) -> the final scale
ScaleFit = Callable[[np.ndarray, list[int], np.ndarray], np.ndarray]


def scale_fit(layer: Layer, ctx: CompileContext) -> ScaleFit | None:
    """How ``clip-weights`` will raise the layer's scale (for its int32 bias and, at W8A8, the
    kernels' overflow bound), on its input's estimated parameters; None where it will not."""
    estimated = estimated_input(layer, ctx)
    if estimated is None:
        return None
    return lambda w, origins, scale: raised_scale(layer, w, origins, scale, estimated.qparams, ctx)[0]


@dataclass
class _Plan:
    """One layer's splits, decided before any graph edit."""

    layer: Layer
    weight: gs.Constant
    splits: list[int]
    origins: list[int]
    reason: str | None

    @property
    def copies(self) -> list[int]:
        return self.origins[len(self.origins) - len(self.splits) :]


def estimated_input(layer: Layer, ctx: CompileContext) -> ClippedActivation | None:
    """The layer's input as ``clip-activations`` will quantize it (None when it stays float or
    has no histogram)."""
    plan, splits = ctx.facts[ACTIVATION_PLAN], ctx.facts[ACTIVATION_SPLITS]
    if ctx.config.abits is None:
        return None
    replaced = splits.replaced
    sources = {replaced.get(n, n): replaced.get(s, s) for n, s in plan.tensors.items()}
    source = sources.get(layer.node.inputs[0].name)
    if source is None:
        return None
    return clipped_activation(*observed(source, ctx.facts[ACTIVATION_STATISTICS], splits), ctx.config)


def output_gain_db(error_without: float, error_with: float, energy: float, input_sqnr: float | None) -> float | None:
    """How many dB splitting raises the layer's output SQNR: its weight's relative quantization
    error (squared error over the weight's energy) plus its input's (1 / SQNR), without the
    splits against with them; None where nothing is to gain or lose."""
    input_noise = 0.0 if input_sqnr is None else 10 ** (-input_sqnr / 10)
    without = error_without / energy + input_noise
    with_ocs = error_with / energy + input_noise
    if not (with_ocs > 0 and without > 0):
        return None
    return 10 * float(np.log10(without / with_ocs))


def _plan_splits(layer: Layer, weight: gs.Constant, ctx: CompileContext) -> _Plan:
    w = weight.values
    channels = w.shape[layer.weight_in_axis]
    if not (layer.splittable and ctx.config.ratio > 0):
        return _Plan(layer, weight, [], channel_origins(channels, []), layer.split_refused)
    splits = plan_channel_splits(w, layer.weight_in_axis, split_count(ctx.config.ratio, channels))
    reason = None
    if splits and ctx.config.ocs_guard:
        fit_scale = scale_fit(layer, ctx)
        with_ocs = quantization_error(layer, w, splits, ctx.config, fit_scale)
        without = quantization_error(layer, w, [], ctx.config, fit_scale)
        energy = float(np.sum(np.square(w, dtype=np.float64)))
        estimated = estimated_input(layer, ctx)
        input_sqnr = estimated.sqnr_db if estimated is not None else None
        gain_db = output_gain_db(without, with_ocs, energy, input_sqnr) if energy > 0 else None
        if not with_ocs < without:
            reason = "splitting did not lower this layer's weight quantization error"
            splits = []
        elif gain_db is not None and gain_db < ctx.config.split_gain_db:
            weight_gain = 10 * np.log10(without / with_ocs)
            against = f", its input's quantization SQNR {input_sqnr:.1f} dB" if input_sqnr is not None else ""
            reason = (
                f"splitting raised this layer's output SQNR by {gain_db:.2f} dB only (weight SQNR "
                f"{weight_gain:+.2f} dB{against}), less than --min-split-gain "
                f"{ctx.config.split_gain_db:g} dB (the copies cost run time)"
            )
            splits = []
    ctx.done_with(w)
    return _Plan(layer, weight, splits, channel_origins(channels, splits), reason)


def _fold_into_producer(
    group: list[_Plan], graph_outputs: set[str], layer_of: dict[int, Layer], out_copies: dict[str, list[int]], ctx
) -> str | None:
    """Widens the producer of the layers' shared input so that it computes the copies; returns
    the producer's name, or None where the input has no region to widen."""
    first = group[0].layer
    x = first.node.inputs[0]
    rank = x.shape and len(x.shape)
    axis = first.input_channel_axis
    if axis >= 0:
        if not rank:
            return None
        axis -= rank
    channels = group[0].weight.values.shape[first.weight_in_axis]
    region = find_region(x, {id(plan.layer.node) for plan in group}, graph_outputs, axis, channels)
    if region is None:
        return None
    quantized = {id(region.root)} if id(region.root) in layer_of else set()
    if id(region.root) in quantized and layer_of[id(region.root)].name in out_copies:
        return None  # already widened for another input's copies
    for owner in widen(region, group[0].copies, ctx.unique_name, quantized):
        out_copies[layer_of[id(owner)].name] = list(group[0].copies)
    return region.root.name


@compiler_pass(
    "weight-ocs",
    requires=(LAYERS, ACTIVATION_PLAN, ACTIVATION_STATISTICS, ACTIVATION_SPLITS),
    produces=(WEIGHT_SPLITS,),
    effect=GraphEffect.EDITS,
)
def weight_ocs(graph: gs.Graph, ctx: CompileContext) -> None:
    """`ceil(r*C_in)` splits per layer on the input channel holding the largest abs weight, kept if they raise the
    layer's output SQNR (its input's noise counted) by `--min-split-gain`; weight rows duplicated; the input's copies
    computed by its producer (widened) or by `Concat(x, Slice(x, c), ...)`."""
    activation_splits, layers = ctx.facts[ACTIVATION_SPLITS], ctx.facts[LAYERS]
    plans = [_plan_splits(layer, activation_splits.weight_of(layer), ctx) for layer in layers]
    # Layers that read the same tensor and copy the same channels share one widening of it.
    groups: dict[tuple, list[_Plan]] = {}
    for plan in plans:
        if plan.splits:
            key = (plan.layer.node.inputs[0].name, plan.layer.input_channel_axis, tuple(plan.copies))
            groups.setdefault(key, []).append(plan)
    graph_outputs = {t.name for t in graph.outputs}
    layer_of = {id(layer.node): layer for layer in layers}
    out_copies: dict[str, list[int]] = {}
    folded_into: dict[str, str | None] = {}
    shared: dict = {}
    widened_inputs: dict[str, str] = {}
    groups_reading: dict[str, list] = {}  # input tensor -> the groups of layers that read it
    for key, group in groups.items():
        groups_reading.setdefault(key[0], []).append(group)
    for key, group in groups.items():
        # the input's readers must all want these copies for its producer to compute them
        root = None
        if ctx.config.fold_ocs_copies and len(groups_reading[key[0]]) == 1:
            root = _fold_into_producer(group, graph_outputs, layer_of, out_copies, ctx)
        for plan in group:
            folded_into[plan.layer.name] = root
        if root is None:
            node = group[0].layer.node
            shared[key] = _widen_input(ctx, node, node.inputs[0], key[1], list(key[2]), widened_inputs)
    result: dict[str, WeightSplit] = {}
    for plan in plans:
        layer, w = plan.layer, plan.weight.values
        copies = out_copies.get(layer.name, [])
        if not plan.splits and not copies:
            result[layer.name] = WeightSplit(w, plan.weight, [], plan.origins, plan.reason)
            continue
        values = split_values(
            w, layer.weight_in_axis, plan.splits, out_copies=(layer.weight_out_axis, copies) if copies else None
        )
        constant = ComputedConstant(ctx.unique_name(f"{plan.weight.name}_ocs"), values)
        layer.node.inputs[1] = constant
        if plan.splits:
            key = (layer.node.inputs[0].name, layer.input_channel_axis, tuple(plan.copies))
            if key in shared:
                layer.node.inputs[0] = shared[key][1]
        reason = plan.reason if not plan.splits else None
        result[layer.name] = WeightSplit(
            w, constant, plan.splits, plan.origins, reason, copies, folded_into.get(layer.name)
        )
    for nodes, _ in shared.values():
        graph.nodes.extend(nodes)
    ctx.facts[WEIGHT_SPLITS] = WeightSplits(result, widened_inputs)

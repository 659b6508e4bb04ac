"""activation-ocs: Outlier Channel Splitting of activations (paper sec. 3.2 eq. 4, sec. 5.3).

For each tensor that plan-activations listed as splittable (``--act-ratio r`` > 0), calibration
kept one histogram per channel. Per channel, count the values beyond the tensor's 99th
percentile of |x|; the ``ceil(r * C)`` channels with the highest counts are split:

    x_s = Concat(x, x[c1], x[c2], ...) * factor (+ offset)

``factor`` halves both copies of a split channel; ``offset`` (``--split qa``) adds -s/4 and +s/4,
a quarter of x_s's quantization step, so that the two quantized halves add up to Q(x) exactly;
the step is known only once clip-activations has run, so ``activation-qa-split`` fills it in.
Every layer reading x reads x_s instead, with the weight rows of the split channels duplicated
unchanged:  x_c W_c  =  (x_c/2) W_c + (x_c/2) W_c.

x_s is quantized in place of x, with statistics derived from the per-channel histograms (the
split channels' histograms halved, counted twice): no second pass over the calibration data.
x itself is no longer quantized, so when x is a Conv output the Conv no longer fuses into a
QLinearConv: activation OCS costs latency (see the README).

The pass runs before weight-ocs, so that weight OCS splits the widened weight it will run with.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.channels import append_channel_copies
from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    ACTIVATION_SPLITS,
    ACTIVATION_STATISTICS,
    LAYERS,
    QA_ACTIVATION_OFFSETS,
    ActivationSplit,
    ActivationSplits,
    Layer,
)
from ocs_onnx.histogram import ChannelHistograms, SymmetricHistogram, halve
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.quant import activation_split_factors, plan_activation_splits

# Paper sec. 5.3: channels are ranked by their count of values beyond this percentile.
OUTLIER_PERCENTILE = 99.0


def split_statistics(histograms: ChannelHistograms, split: list[int]) -> tuple[tuple[float, float], SymmetricHistogram]:
    """Range and histogram of the tensor after splitting ``split``: the other channels as they
    are, plus each split channel's values halved, twice."""
    kept = np.setdiff1d(np.arange(histograms.channels), split)
    histogram = histograms.tensor_histogram(kept)
    histogram.counts = histogram.counts + 2 * halve(histograms.tensor_histogram(split)).counts
    lo = np.concatenate([histograms.lo[kept], histograms.lo[split] / 2.0])
    hi = np.concatenate([histograms.hi[kept], histograms.hi[split] / 2.0])
    return (float(lo.min()), float(hi.max())), histogram


def _broadcast_shape(layer: Layer, channels: int) -> tuple[int, ...]:
    """Shape of a per-channel constant that broadcasts along the layer input's channel axis."""
    axis = layer.input_channel_axis
    if axis < 0:
        trailing = -axis - 1
    else:
        rank = layer.model_weight.ndim if layer.op == "Conv" else 2
        trailing = rank - 1 - axis
    return (channels,) + (1,) * trailing


def _split_tensor(ctx: CompileContext, x: gs.Variable, axis: int, split: list[int], layer: Layer) -> tuple:
    """The nodes computing x_s from x, x_s, and the offset constant (None for --split naive)."""
    channels = layer.model_weight.shape[layer.weight_in_axis]
    factor, offset_steps = activation_split_factors(channels, split)
    shape = _broadcast_shape(layer, channels + len(split))
    nodes, _, widened = append_channel_copies(ctx, f"{x.name}_act_ocs", x, axis, split)
    factor_constant = gs.Constant(ctx.unique_name(f"{x.name}_act_ocs_factor"), factor.reshape(shape))
    halved = gs.Variable(ctx.unique_name(f"{x.name}_act_ocs_halved"), dtype=x.dtype, shape=widened.shape)
    nodes.append(
        gs.Node("Mul", ctx.unique_name(f"{x.name}_act_ocs_mul"), inputs=[widened, factor_constant], outputs=[halved])
    )
    if ctx.config.split != "qa":
        return nodes, halved, None, offset_steps
    offset = gs.Constant(ctx.unique_name(f"{x.name}_act_ocs_offset"), np.zeros(shape, dtype=np.float32))
    split_x = gs.Variable(ctx.unique_name(f"{x.name}_act_ocs_split"), dtype=x.dtype, shape=widened.shape)
    nodes.append(gs.Node("Add", ctx.unique_name(f"{x.name}_act_ocs_add"), inputs=[halved, offset], outputs=[split_x]))
    return nodes, split_x, offset, offset_steps.reshape(shape)


def _duplicate_weight_rows(ctx: CompileContext, layer: Layer, split: list[int]) -> gs.Constant:
    """The layer reads a weight with the rows of the copied channels appended; returns it."""
    w = layer.model_weight
    widened = np.concatenate([w, np.take(w, split, axis=layer.weight_in_axis)], axis=layer.weight_in_axis)
    weight = gs.Constant(ctx.unique_name(f"{layer.weight.name}_act_ocs"), widened)
    layer.node.inputs[1] = weight
    return weight


@compiler_pass("activation-ocs", requires=(LAYERS, ACTIVATION_PLAN, ACTIVATION_STATISTICS),
               produces=(ACTIVATION_SPLITS,), effect=GraphEffect.EDITS)
def activation_ocs(graph: gs.Graph, ctx: CompileContext) -> None:
    """`--act-ratio`: the channels with the most values beyond the 99th percentile are copied
    and halved (`Concat(x, Slice(x, c), ...) * f`), the layers' weight rows duplicated."""
    ratio = ctx.config.act_ratio
    if ratio <= 0 or ctx.config.abits is None:
        ctx.facts[ACTIVATION_SPLITS] = ActivationSplits()
        return
    result = ActivationSplits()
    statistics = ctx.facts[ACTIVATION_STATISTICS]
    tensors = graph.tensors()
    readers: dict[str, list[Layer]] = {}
    for layer in ctx.facts[LAYERS]:
        readers.setdefault(layer.node.inputs[0].name, []).append(layer)
    for name, (axis, _) in ctx.facts[ACTIVATION_PLAN].split_candidates.items():
        histograms = statistics.channel_histograms.get(name)
        if histograms is None or histograms.limit == 0.0:
            continue
        split = plan_activation_splits(histograms.counts_beyond_percentile(OUTLIER_PERCENTILE), ratio)
        if not split:
            continue
        x = tensors[name]
        nodes, split_x, offset, offset_steps = _split_tensor(ctx, x, axis, split, readers[name][0])
        graph.nodes.extend(nodes)
        for layer in readers[name]:
            layer.node.inputs[0] = split_x
            result.widened_weights[layer.name] = _duplicate_weight_rows(ctx, layer, split)
            result.copied_channels[layer.name] = list(split)
        split_range, split_histogram = split_statistics(histograms, split)
        result.splits[split_x.name] = ActivationSplit(name, split, offset, offset_steps, split_range, split_histogram)
    ctx.facts[ACTIVATION_SPLITS] = result


@compiler_pass("activation-qa-split", requires=(ACTIVATION_SPLITS, ACTIVATION_QPARAMS),
               produces=(QA_ACTIVATION_OFFSETS,), effect=GraphEffect.EDITS)
def activation_qa_split(graph: gs.Graph, ctx: CompileContext) -> None:
    """The activation OCS offsets: -s/4 and +s/4 with the split tensor's final step s (`--split
    qa`)."""
    qparams = ctx.facts[ACTIVATION_QPARAMS]
    for name, split in ctx.facts[ACTIVATION_SPLITS].splits.items():
        if split.offset is not None:
            step = np.float32(qparams[name].scale)
            split.offset.values = (split.offset_steps * step).astype(np.float32)
    ctx.facts[QA_ACTIVATION_OFFSETS] = True

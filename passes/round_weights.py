"""round-weights: with ``--rounding hessian``, every layer's weight levels are chosen by GPTQ
on the Gram matrix of its calibration inputs (``ocs_onnx/hessian.py``) instead of rounded to the
nearest level; with ``--bias-correction``, its bias absorbs the mean output shift the rounding
causes on those inputs.

The grid is clip-weights' (the scales, and the overflow bound, are not touched). A split layer
reads its input with copies of the split channels: its Gram matrix is the input's with those
channels' rows and columns repeated, so the piece rounded second sees the first piece's rounding
error, perfectly correlated, and absorbs it. The pieces' levels then no longer add up to the
nearest level of the whole, as the quantization-aware split's do (paper eq. 6): their total is
GPTQ's choice for the layer's output.

A depthwise Conv's rows each read one channel: each gets GPTQ on its own channel's Gram matrix.
A layer stays on nearest rounding (said in the report) where its inputs cannot be read as rows
(a grouped Conv that is not depthwise, SAME padding), where activation OCS rescaled its input
channels, or where its weight is shared with another layer.

refine-rounding (``--rounding-inputs quantized``) runs once the model is quantized.
The float model's layer inputs are not what the quantized layers get: every layer before them
adds its error. So the calibration data runs once more through the float model and the
quantized one side by side, and every Hessian-rounded layer (but depthwise Convs) is rounded
again by GPTQ on its quantized inputs x~ (H = sum x~ x~^T, its split layout as it is). The new
levels are kept only where they bring the layer's output closer to the float layer's,
``||W x - Q x~||`` on those data (``hessian.PairedGram``): the target stays the float output.
The layers before a layer are those of the first rounding then, not the refined ones: one
more pass, not one per layer. With ``--bias-correction`` the refinement is left out (the
correction was computed for the first levels).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocs_onnx.calibration import FETCH_BUDGET_BYTES, prepare_feed
from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_SPLITS,
    FLOAT_RUN,
    LAYER_INPUTS,
    LAYERS,
    QA_WEIGHT_OFFSETS,
    QUANTIZED_ACTIVATIONS,
    QUANTIZED_WEIGHTS,
    REFINED_LEVELS,
    WEIGHT_LEVELS,
    WEIGHT_SCALES,
    WEIGHT_SPLITS,
    Layer,
    WeightLevels,
    WeightSplit,
)
from ocs_onnx.gs_adapter import constant_array, graph_skeleton
from ocs_onnx.hessian import (
    InputGram,
    PairedGram,
    float_output_objective,
    hessian_levels,
    hessian_levels_per_row,
    output_error,
)
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.quant import quantize_symmetric
from ocs_onnx.sessions import BASIC_OPTIMIZATION, new_session
from ocs_onnx.weights import scale_axis


def _as_rows(w: np.ndarray, layer: Layer) -> tuple[np.ndarray, tuple[int, ...]]:
    """The weight as rows of the features the layer multiplies them with (output channels
    first, then the input layout: channel, kernel row, kernel column), and the moved shape."""
    moved = np.moveaxis(w, layer.weight_out_axis, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape


def _from_rows(rows: np.ndarray, moved_shape: tuple[int, ...], layer: Layer) -> np.ndarray:
    return np.moveaxis(rows.reshape(moved_shape), 0, layer.weight_out_axis)


def _feature_origins(split: WeightSplit, moved_shape: tuple[int, ...]) -> np.ndarray:
    """For every feature of the (split) weight's rows, the feature of the layer's original input
    it multiplies: a split channel's piece multiplies its original's values."""
    origins = np.asarray(split.channel_origins)
    positions = int(np.prod(moved_shape[2:]))
    return (origins[:, None] * positions + np.arange(positions)[None, :]).reshape(-1)


def _why_nearest(layer: Layer, gram: InputGram | None, shared: bool, copied: bool, features: int) -> str | None:
    if gram is None:
        return "nearest (its input is not read as rows: a grouped Conv, SAME padding, or a transposed input)"
    if shared:
        return "nearest (its weight is shared with another layer)"
    if copied:
        return "nearest (activation OCS rescaled its input channels)"
    if gram.gram is None or gram.rows == 0 or features == 0:
        return "nearest (no calibration inputs reached it)"
    return None


@compiler_pass(
    "round-weights",
    requires=(LAYERS, WEIGHT_SPLITS, WEIGHT_SCALES, QA_WEIGHT_OFFSETS, ACTIVATION_SPLITS, LAYER_INPUTS),
    produces=(WEIGHT_LEVELS,),
    effect=GraphEffect.EDITS,
)
def round_weights(graph: gs.Graph, ctx: CompileContext) -> None:
    """`--rounding hessian`: weight levels chosen by GPTQ on each layer's calibration inputs;
    `--bias-correction`: the bias absorbs the mean output shift of the rounding"""
    config = ctx.config
    chosen: dict[str, WeightLevels] = {}
    ctx.facts[WEIGHT_LEVELS] = chosen
    if not config.reads_layer_inputs:
        return
    splits, scales, grams = ctx.facts[WEIGHT_SPLITS].layers, ctx.facts[WEIGHT_SCALES], ctx.facts[LAYER_INPUTS]
    copied = ctx.facts[ACTIVATION_SPLITS].copied_channels
    readers: dict[int, int] = {}
    for layer in ctx.facts[LAYERS]:
        key = id(splits[layer.name].constant)
        readers[key] = readers.get(key, 0) + 1
    bits = config.weight_bits
    for layer in ctx.facts[LAYERS]:
        split, scale = splits[layer.name], scales[layer.name].scale
        gram = grams.get(layer.name)
        w = split.constant.values
        rows, moved_shape = _as_rows(w, layer)
        reason = _why_nearest(layer, gram, readers[id(split.constant)] > 1, bool(copied.get(layer.name)), rows.shape[1])
        if reason is not None:
            chosen[layer.name] = WeightLevels(None, reason if config.rounding_method == "hessian" else "nearest")
            continue
        if gram.layout.kind == "depthwise2d":  # row o reads channel o alone: its own Gram matrix
            origins = np.asarray(list(range(rows.shape[0] - len(split.out_copies))) + list(split.out_copies))
            in_range = origins.max(initial=-1) < gram.gram.shape[0] and rows.shape[1] == gram.gram.shape[1]
            h, mean = (gram.gram[origins], gram.mean[origins]) if in_range else (None, None)
        else:
            origins = _feature_origins(split, moved_shape)
            in_range = origins.max(initial=-1) < gram.gram.shape[0]
            h, mean = (gram.gram[np.ix_(origins, origins)], gram.mean[origins]) if in_range else (None, None)
        if h is None:
            chosen[layer.name] = WeightLevels(None, "nearest (its input's layout differs from its weight's)")
            continue
        row_scale = scale if scale_axis(layer, config.granularity) is not None else np.asarray(scale)
        nearest = quantize_symmetric(rows, row_scale[:, None] if np.ndim(row_scale) else row_scale, bits)
        levels, rounding, ratio, final = None, "nearest", None, nearest
        if config.rounding_method == "hessian":
            gptq = hessian_levels_per_row if h.ndim == 3 else hessian_levels
            try:
                hessian = gptq(rows, h, row_scale, bits)
            except np.linalg.LinAlgError:  # no usable Hessian even dampened: the inputs say nothing
                chosen[layer.name] = WeightLevels(None, "nearest (its inputs give no positive definite Hessian)")
                continue
            base = output_error(rows, nearest, row_scale, h)
            ratio = output_error(rows, hessian, row_scale, h) / base if base > 0 else 1.0
            levels, rounding, final = _from_rows(hessian, moved_shape, layer), "hessian", hessian
        corrected = config.bias_correction and _correct_bias(layer, rows, final, row_scale, mean, ctx)
        chosen[layer.name] = WeightLevels(levels, rounding, ratio, corrected)
        ctx.done_with(split.unsplit)


def _correct_bias(layer: Layer, rows, levels, scale, mean: np.ndarray, ctx: CompileContext) -> bool:
    """Adds E[(W - Q) x] to the layer's bias (a new one where it has none); False where the
    layer has no bias input that takes one value per output channel (a MatMul)."""
    node = layer.node
    if layer.op == "MatMul":
        return False
    s = np.asarray(scale, dtype=np.float64)
    dequantized = levels * (s[:, None] if s.ndim else s)
    delta = np.asarray(rows, dtype=np.float64) - dequantized
    shift = (delta * mean).sum(axis=1) if mean.ndim == 2 else delta @ mean  # one mean per row, or one for all
    if len(node.inputs) >= 3 and node.inputs[2] is not None and node.inputs[2].name:
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant) or bias.values.shape != shift.shape:
            return False
        node.inputs[2] = gs.Constant(
            ctx.unique_name(f"{bias.name}_corrected"), (bias.values + shift).astype(bias.values.dtype)
        )
    else:
        node.inputs.append(gs.Constant(ctx.unique_name(f"{layer.name}_bias_corrected"), shift.astype(np.float32)))
    return True


def _quantized_weight_constant(layer: Layer) -> gs.Constant | None:
    """The int8 initializer the layer's weight DequantizeLinear reads (quantize-weights')."""
    weight = layer.node.inputs[1]
    producer = weight.inputs[0] if weight.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not isinstance(producer.inputs[0], gs.Constant):
        return None
    return producer.inputs[0]


def _paired_inputs(graph: gs.Graph, layers: list[Layer], ctx: CompileContext) -> dict[str, PairedGram]:
    """Runs the float model and the quantized graph on the calibration batches again, side by
    side, and gathers every layer's ``PairedGram``."""
    replay = ctx.facts[FLOAT_RUN]
    layouts = ctx.facts[ACTIVATION_PLAN].input_layouts
    pairs = {
        layer.name: PairedGram(layouts[layer.name], layer.node.inputs[0].name, ctx.config.seed) for layer in layers
    }
    float_names = sorted({pair.layout.tensor for pair in pairs.values()})
    quantized_names = sorted({pair.quantized_tensor for pair in pairs.values()})
    quantized_model, left_out = graph_skeleton(graph)
    quantized_constants = {name: constant_array(c) for name, c in left_out.items()}
    sessions = []
    for model, names in ((onnx.ModelProto.FromString(replay.model), float_names), (quantized_model, quantized_names)):
        inputs = {i.name for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        for name in names:
            if name not in inputs and name not in outputs:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        sessions.append(new_session(model.SerializeToString(), BASIC_OPTIMIZATION, memory_arena=False))
    float_session, quantized_session = sessions
    input_names = {s.name for s in replay.specs}

    def run(session, names, feed, constants) -> dict[str, np.ndarray]:
        fetched = [n for n in names if n not in input_names]
        values = dict(zip(fetched, session.run(fetched, {**feed, **constants})))
        values.update({n: feed[n] for n in names if n in input_names})
        return values

    chunk = 0 if replay.fixed_batch else None  # None: measured on the first sample, as calibration does
    for index, feed in enumerate(replay.batches()):
        feed = prepare_feed(feed, replay.specs, f"calibration batch {index}")
        rows = len(next(iter(feed.values()))) if feed else 1
        start = 0
        while start < rows:
            size = 1 if chunk is None else (chunk or rows)
            part = {k: v[start : start + size] for k, v in feed.items()}
            float_values = run(float_session, float_names, part, replay.constants)
            quantized_values = run(quantized_session, quantized_names, part, quantized_constants)
            for pair in pairs.values():
                pair.update(float_values[pair.layout.tensor], quantized_values[pair.quantized_tensor])
            if chunk is None:
                per_sample = sum(v.nbytes for v in (*float_values.values(), *quantized_values.values()))
                chunk = max(1, int(FETCH_BUDGET_BYTES // max(per_sample, 1)))
            start += size
    return pairs


@compiler_pass(
    "refine-rounding",
    requires=(
        LAYERS,
        WEIGHT_SPLITS,
        WEIGHT_SCALES,
        WEIGHT_LEVELS,
        ACTIVATION_PLAN,
        FLOAT_RUN,
        QUANTIZED_WEIGHTS,
        QUANTIZED_ACTIVATIONS,
    ),  # fmt: skip
    produces=(REFINED_LEVELS,),
    effect=GraphEffect.EDITS,
)
def refine_rounding(graph: gs.Graph, ctx: CompileContext) -> None:
    """`--rounding-inputs quantized`: each Hessian-rounded layer rounded again on the quantized model's inputs, kept
    where its output gets closer to the float layer's"""
    refined: dict[str, WeightLevels] = {}
    ctx.facts[REFINED_LEVELS] = refined
    if not ctx.config.refines_rounding or ctx.facts[FLOAT_RUN] is None:
        return
    chosen, layouts = ctx.facts[WEIGHT_LEVELS], ctx.facts[ACTIVATION_PLAN].input_layouts
    candidates = [
        layer
        for layer in ctx.facts[LAYERS]
        if chosen.get(layer.name) is not None
        and chosen[layer.name].levels is not None
        and layer.name in layouts
        and layouts[layer.name].kind in ("rows", "conv2d")  # a depthwise Conv keeps its float-input rounding
        and _quantized_weight_constant(layer) is not None
    ]
    if not candidates:
        return
    pairs = _paired_inputs(graph, candidates, ctx)
    splits, scales, bits = ctx.facts[WEIGHT_SPLITS].layers, ctx.facts[WEIGHT_SCALES], ctx.config.weight_bits
    for layer in candidates:
        pair, split = pairs[layer.name], splits[layer.name]
        rows, moved_shape = _as_rows(split.constant.values, layer)
        origins = _feature_origins(split, moved_shape)
        if pair.gram is None or pair.gram.shape[0] != rows.shape[1] or origins.max(initial=-1) >= pair.cross.shape[0]:
            continue
        scale = scales[layer.name].scale
        row_scale = scale if scale_axis(layer, ctx.config.granularity) is not None else np.asarray(scale)
        current = _as_rows(chosen[layer.name].levels, layer)[0]
        try:
            levels = hessian_levels(rows, pair.gram, row_scale, bits)
        except np.linalg.LinAlgError:
            continue
        cross = pair.cross[origins, :]  # the float features spread over the split layout
        if float_output_objective(rows, levels, row_scale, pair.gram, cross) >= float_output_objective(
            rows, current, row_scale, pair.gram, cross
        ):
            continue
        constant = _quantized_weight_constant(layer)
        values = _from_rows(levels, moved_shape, layer).astype(constant.values.dtype)
        replacement = gs.Constant(ctx.unique_name(f"{constant.name}_refined"), values)
        layer.node.inputs[1].inputs[0].inputs[0] = replacement  # the weight's DequantizeLinear reads it
        nearest = quantize_symmetric(rows, row_scale[:, None] if np.ndim(row_scale) else row_scale, bits)
        base = output_error(rows, nearest, row_scale, pair.gram)
        ratio = output_error(rows, levels, row_scale, pair.gram) / base if base > 0 else 1.0
        refined[layer.name] = WeightLevels(values, "hessian, quantized inputs", ratio)
        ctx.done_with(split.unsplit)
    ctx.count(layers_refined=len(refined), layers_considered=len(candidates))

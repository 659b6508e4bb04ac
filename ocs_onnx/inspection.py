"""``inspect``: what a model's layers look like to a quantizer, before compiling it. Per layer:
how far its weights' largest value stands out (max / std, kurtosis, the part of the range only
the largest input channel reaches), the OCS ratio that would halve its weight quantization
error; with data, how unevenly its input's channels range (what one scale per tensor pays for)
and the sensitivity ranking of the compile (``analyze-sensitivity``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx

from .calibration import model_input_specs, open_calibration_data, prepare_feed
from .config import CompileConfig
from .gs_adapter import constant_array, graph_skeleton
from .loading import load_model
from .quant import (
    apply_channel_splits,
    expand_to,
    max_abs,
    plan_channel_splits,
    quantization_levels,
    split_count,
    symmetric_scale,
)
from .sessions import BASIC_OPTIMIZATION, new_session

# The OCS ratios tried for "the ratio that halves the weight error" (the paper's range and beyond).
RATIO_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def weight_outlier_statistics(w: np.ndarray, in_axis: int) -> dict:
    """max|w| / std(w), the excess kurtosis of the values, and the part of the range [0, max|w|]
    that only the input channel holding the largest |w| reaches: 1 - (second channel's max) /
    (largest channel's max)."""
    values = np.asarray(w, dtype=np.float64).ravel()
    centred = values - values.mean()
    variance = float(np.mean(centred**2))
    channel_max = np.sort(np.asarray(max_abs(np.asarray(w, dtype=np.float64), in_axis)).ravel())[::-1]
    top = float(channel_max[0]) if channel_max.size else 0.0
    second = float(channel_max[1]) if channel_max.size > 1 else top
    return {
        "max_over_std": float(np.abs(values).max() / math.sqrt(variance)) if variance > 0 else None,
        "kurtosis": float(np.mean(centred**4) / variance**2 - 3.0) if variance > 0 else None,
        "range_only_top_channel": (1.0 - second / top) if top > 0 else 0.0,
    }


def weight_error_at_ratio(w: np.ndarray, in_axis: int, out_axis: int | None, ratio: float, bits: int) -> float:
    """Mean squared error of the layer's effective weight with OCS at ``ratio`` and the
    quantization-aware split: its pieces' levels add up to the original value's on the grid the
    split weight's range gives, so the error is that of the original weight on that grid."""
    w = np.asarray(w, dtype=np.float64)
    splits = plan_channel_splits(w, in_axis, split_count(ratio, w.shape[in_axis]))
    split = apply_channel_splits(w, in_axis, splits)
    scale = expand_to(symmetric_scale(max_abs(split, out_axis), bits), w.ndim, out_axis)
    # unclamped: a split channel's two pieces hold up to twice the grid's largest level together
    return float(np.mean((w - quantization_levels(w, scale) * scale) ** 2))


def ratio_halving_error(w: np.ndarray, in_axis: int, out_axis: int | None, bits: int) -> float | None:
    """The smallest ratio of RATIO_GRID whose OCS halves the weight error of ratio 0 (None:
    none does, or the weight quantizes exactly)."""
    base = weight_error_at_ratio(w, in_axis, out_axis, 0.0, bits)
    if base == 0:
        return None
    return next((r for r in RATIO_GRID if weight_error_at_ratio(w, in_axis, out_axis, r, bits) <= base / 2), None)


def channel_spread(channel_peaks: np.ndarray) -> float | None:
    """Widest channel's max |x| over the median channel's: how much of a per-tensor grid the
    typical channel leaves unused."""
    peaks = np.asarray(channel_peaks, dtype=np.float64)
    median = float(np.median(peaks)) if peaks.size else 0.0
    return float(peaks.max() / median) if median > 0 else None


def inspect_model(
    model: str | os.PathLike,
    calib_data: str | os.PathLike | None = None,
    wbits: int = 8,
    granularity: str = "channel",
    samples: int = 32,
) -> dict:
    """The per-layer statistics (and with ``calib_data`` the input spreads and the sensitivity
    ranking of the default compile at ``wbits``)."""
    from .compiler import compile, compile_graph
    from .facts import LAYERS

    config = CompileConfig(wbits=wbits, granularity=granularity, abits=None, verify=False, stop_after="select-layers")
    source = load_model(model)
    graph, ctx = compile_graph(source, config, "inspect", scratch=None)
    layers = ctx.facts[LAYERS]
    entries = []
    for layer in layers:
        w = layer.model_weight
        out_axis = layer.weight_out_axis if granularity == "channel" else None
        entry = {"name": layer.name, "op": layer.op, "weight_shape": list(w.shape)}
        entry.update(weight_outlier_statistics(w, layer.weight_in_axis))
        entry["ratio_halving_weight_error"] = (
            ratio_halving_error(w, layer.weight_in_axis, out_axis, config.weight_bits) if layer.splittable else None
        )
        entry["splittable"] = layer.splittable
        entries.append(entry)
    result = {"model": str(model), "wbits": wbits, "granularity": granularity, "layers": entries, "sensitivity": None}
    if calib_data is None:
        return result
    spreads = _input_spreads(graph, layers, Path(calib_data), samples)
    for entry in entries:
        entry["input_channel_spread"] = spreads.get(entry["name"])
    _, report = compile(model, wbits=wbits, granularity=granularity, calib_data=calib_data, sensitivity=True)
    ranking = report["sensitivity"]
    by_layer = {c["name"]: c["output_sqnr_db_alone"] for c in ranking["candidates"] if c["kind"] == "weight"}
    for entry in entries:
        entry["sensitivity_db"] = by_layer.get(entry["name"])
    result["sensitivity"] = {
        "held_out_samples": ranking["held_out_samples"],
        "output_sqnr_db": ranking["output_sqnr_db"]["as_quantized"],
        "candidates": [
            {k: c[k] for k in ("name", "kind", "output_sqnr_db_alone", "members")} for c in ranking["candidates"]
        ],
    }
    return result


def _input_spreads(graph, layers, calib_data: Path, samples: int) -> dict[str, float | None]:
    """{layer: channel spread of its input} over the first ``samples`` of the data."""
    model, left_out = graph_skeleton(graph)
    constants = {name: constant_array(c) for name, c in left_out.items()}
    specs = [s for s in model_input_specs(model) if s.name not in constants]
    tensors = {layer.name: (layer.node.inputs[0].name, layer.input_channel_axis) for layer in layers}
    wanted = sorted({name for name, _ in tensors.values()})
    outputs = {o.name for o in model.graph.output}
    inputs = {s.name for s in specs}
    for name in wanted:
        if name not in outputs and name not in inputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = new_session(model.SerializeToString(), BASIC_OPTIMIZATION, memory_arena=False)
    peaks: dict[tuple[str, int], np.ndarray] = {}
    fixed = next((s.batch_dim for s in specs if s.batch_dim is not None), None)
    data = open_calibration_data(calib_data, specs)
    fetched = [n for n in wanted if n not in inputs]
    for index, feed in enumerate(data.batches(samples, fixed or 8)):
        feed = prepare_feed(feed, specs, f"batch {index}")
        values = dict(zip(fetched, session.run(fetched, {**feed, **constants})))
        values.update({n: feed[n] for n in wanted if n in inputs})
        for layer_name, (name, axis) in tensors.items():
            x = np.abs(np.asarray(values[name], dtype=np.float32))
            if x.ndim == 0:
                continue
            key = (name, axis)
            peak = x.max(axis=tuple(a for a in range(x.ndim) if a != axis % x.ndim))
            peaks[key] = peak if key not in peaks else np.maximum(peaks[key], peak)
    return {layer: channel_spread(peaks[key]) if key in peaks else None for layer, key in tensors.items()}


def inspection_text(result: dict) -> str:
    def number(value, digits: int = 2, suffix: str = "") -> str:
        return "-" if value is None else f"{value:.{digits}f}{suffix}"

    with_data = result["sensitivity"] is not None
    header = ["layer", "op", "weight", "max/std", "kurtosis", "top-channel range", "OCS ratio halving error"]
    if with_data:
        header += ["input spread", "sensitivity"]
    rows = [header]
    for layer in result["layers"]:
        row = [
            layer["name"],
            layer["op"],
            "x".join(map(str, layer["weight_shape"])),
            number(layer["max_over_std"], 1),
            number(layer["kurtosis"], 1),
            number(100 * layer["range_only_top_channel"], 0, " %"),
            ("> 0.5" if layer["ratio_halving_weight_error"] is None else f"{layer['ratio_halving_weight_error']:g}")
            if layer["splittable"]
            else "not splittable",
        ]
        if with_data:
            row += [number(layer.get("input_channel_spread"), 1, "x"), number(layer.get("sensitivity_db"), 1, " dB")]
        rows.append(row)
    widths = [min(max(len(r[i]) for r in rows), 40) for i in range(len(header))]
    lines = ["  ".join(cell[:40].ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if with_data:
        sensitivity = result["sensitivity"]
        top = [c for c in sensitivity["candidates"] if c["output_sqnr_db_alone"] is not None][:5]
        lines.append(
            f"sensitivity on {sensitivity['held_out_samples']} held-out samples (output SQNR "
            f"{number(sensitivity['output_sqnr_db'], 1)} dB as compiled at W{result['wbits']}A8); most sensitive: "
            + ", ".join(f"{c['name']} ({c['kind']}, {c['output_sqnr_db_alone']:.1f} dB alone)" for c in top)
        )
    return "\n".join(lines)

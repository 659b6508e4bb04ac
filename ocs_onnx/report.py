"""The compile report: a JSON document for pipelines and a short table for people."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx

from . import __version__
from .config import CompileConfig
from .context import CompileContext, Facts
from .facts import (
    ACTIVATION_CLIPPING,
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    ACTIVATION_SPLITS,
    ACTIVATION_STATISTICS,
    CALIBRATION,
    KEPT_FLOAT,
    LAYERS,
    VERIFICATION,
    REFINED_LEVELS,
    SENSITIVITY,
    WEIGHT_LEVELS,
    WEIGHT_QUALITY,
    WEIGHT_SCALES,
    WEIGHT_SPLITS,
    ActivationSplits,
    Layer,
    WeightLevels,
    WeightQuality,
    WeightScale,
    WeightSplit,
    activations_to_quantize,
    observed,
)


def _weight_count(model: onnx.ModelProto) -> int:
    """Elements of every stored tensor: initializers and the values of Constant nodes (where
    paddle2onnx and older exporters keep their weights). Subgraphs are not counted."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in tensors))


def _scale_value(scale) -> float | list[float]:
    scale = np.asarray(scale, dtype=np.float32)
    return float(scale) if scale.ndim == 0 else [float(s) for s in scale]


def _round(value: float | None, digits: int = 3) -> float | None:
    """Rounded for reading; None where there is no finite value (JSON has no infinity)."""
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def combined_sqnr_db(qualities: list[WeightQuality], attribute: str) -> float | None:
    """SQNR of all quantized weights taken together: total signal energy over total noise."""
    signal = noise = 0.0
    for quality in qualities:
        value = getattr(quality, attribute)
        signal += quality.energy
        noise += 0.0 if value is None else quality.energy / 10 ** (value / 10)
    return None if noise == 0.0 or signal == 0.0 else 10 * math.log10(signal / noise)


@dataclass(frozen=True)
class _LayerView:
    """What the passes that ran found about one layer (None: the pass did not run)."""

    layer: Layer
    copied_channels: list[int]
    weight_shape: list[int]  # as the layer reads it before weight OCS
    split: WeightSplit | None
    scale: WeightScale | None
    quality: WeightQuality | None
    levels: WeightLevels | None = None

    @property
    def splits(self) -> list[int]:
        return self.split.splits if self.split is not None else []

    @property
    def weight_shape_after(self) -> list[int]:
        return list(self.split.constant.shape) if self.split is not None and self.split.widened else self.weight_shape

    @property
    def copies(self) -> str | None:
        """Where a split layer's input copies are made: "folded into <producer>" or "run time"."""
        if not self.splits:
            return None
        return f"folded into {self.split.copies_folded_into}" if self.split.copies_folded_into else "run time"

    @property
    def not_split_reason(self) -> str | None:
        return self.split.not_split_reason if self.split is not None else self.layer.split_refused


def _layer_views(facts: Facts) -> list[_LayerView]:
    activation_splits = facts.get(ACTIVATION_SPLITS, ActivationSplits())
    weight_splits = facts.get(WEIGHT_SPLITS)
    scales, qualities = facts.get(WEIGHT_SCALES, {}), facts.get(WEIGHT_QUALITY, {})
    views = []
    for layer in facts.get(LAYERS, []):
        views.append(
            _LayerView(
                layer,
                activation_splits.copied_channels.get(layer.name, []),
                list(activation_splits.weight_of(layer).shape),
                weight_splits.layers[layer.name] if weight_splits is not None else None,
                scales.get(layer.name),
                qualities.get(layer.name),
                facts.get(REFINED_LEVELS, {}).get(layer.name) or facts.get(WEIGHT_LEVELS, {}).get(layer.name),
            )
        )
    return views


def layer_entry(view: _LayerView, config: CompileConfig) -> dict:
    layer, scale, quality = view.layer, view.scale, view.quality
    split_channels = view.split.channel_origins[view.split.input_channels :] if view.split is not None else []
    return {
        "name": layer.name,
        "op": layer.op,
        "weight_shape": list(layer.model_weight.shape),
        "weight_shape_after": view.weight_shape_after,
        "split": bool(view.splits),
        "not_split_reason": view.not_split_reason,
        "channels_split": len(view.splits),
        "split_channels": [int(c) for c in split_channels],
        "activation_copies": [int(c) for c in view.copied_channels],
        "input_copies": view.copies,
        "output_channels_computed_twice": [int(c) for c in view.split.out_copies] if view.split is not None else [],
        "bits": config.weight_bits,
        "granularity": config.granularity,
        "scale": _scale_value(scale.scale) if scale is not None else None,
        "scales_raised_for_bias": scale.raised_for_bias if scale is not None else 0,
        "scales_raised_for_overflow": scale.raised_for_overflow if scale is not None else 0,
        "rounding": view.levels.rounding if view.levels is not None else "nearest",
        "output_error_vs_nearest": _round(view.levels.output_error_vs_nearest) if view.levels is not None else None,
        "bias_corrected": bool(view.levels.bias_corrected) if view.levels is not None else False,
        "clip": {
            "method": config.wclip,
            "threshold": _scale_value(scale.clip_threshold) if scale is not None else None,
            "max_abs": _scale_value(scale.max_abs) if scale is not None else None,
        },
        "sqnr_db": {
            "without_ocs": _round(quality.sqnr_without_ocs_db) if quality is not None else None,
            "with_ocs": _round(quality.sqnr_with_ocs_db) if quality is not None else None,
        },
    }


def _activation_entries(facts: Facts, config: CompileConfig) -> dict:
    qparams = facts.get(ACTIVATION_QPARAMS, {})
    if not qparams:
        return {}
    splits, statistics = facts.get(ACTIVATION_SPLITS), facts.get(ACTIVATION_STATISTICS)
    clipping = facts.get(ACTIVATION_CLIPPING)
    sources = activations_to_quantize(facts.get(ACTIVATION_PLAN), splits, facts.get(WEIGHT_SPLITS))
    entries = {}
    for name, qp in qparams.items():
        if name not in sources:
            continue  # a scalar constant of an integer op (listed with the integer ops)
        source = sources[name]
        (lo, hi), _ = observed(source, statistics, splits)
        split = splits.splits.get(source)
        entries[name] = {
            "scale": qp.scale,
            "zero_point": qp.zero_point,
            "type": np.dtype(qp.dtype).name,
            "shares_parameters_of": source if source != name else None,
            "range": [lo, hi],
            "clip": {
                "method": config.aclip,
                "threshold": clipping.thresholds.get(source),
                "max_abs": max(abs(lo), abs(hi)),
                "range": list(clipping.clipped_ranges[source]),
            },
            "split": {"of": split.tensor, "channels": split.channels} if split is not None else None,
            "sqnr_db": _round(clipping.sqnr_db.get(source)),
        }
    return entries


def _integer_op_entries(facts: Facts) -> dict:
    """The ops beyond the layers that were planned as integer kernels and kept so: {node: kernel}."""
    plan, qparams = facts.get(ACTIVATION_PLAN), facts.get(ACTIVATION_QPARAMS, {})
    if plan is None or not qparams:
        return {}
    # an op one of whose tensors calibration kept float runs in float
    return {
        node: kernel for node, (kernel, tensors) in plan.integer_ops.items() if all(t in qparams for t in tensors)
    }


def _kept_float_activations(facts: Facts) -> dict:
    clipping = facts.get(ACTIVATION_CLIPPING)
    return dict(clipping.kept_float) if clipping is not None else {}


def _sensitivity_entry(facts: Facts) -> dict | None:
    """The sensitivity analysis: every candidate, most sensitive first, with its output SQNR
    alone and whether the target kept it float."""
    sensitivity = facts.get(SENSITIVITY)
    if sensitivity is None:
        return None
    kept = set(sensitivity.kept_float)
    order = sorted(range(len(sensitivity.candidates)), key=lambda i: (sensitivity.alone_db[i], i))
    return {
        "held_out_samples": sensitivity.held_out_samples,
        "ranking_samples": sensitivity.ranking_samples,
        "target_sqnr_db": sensitivity.target_db,
        "output_sqnr_db": {"as_quantized": _round(sensitivity.quantized_db), "final": _round(sensitivity.final_db)},
        "kept_float": [sensitivity.candidates[i].name for i in sensitivity.kept_float],
        "metric": sensitivity.metric,
        "candidates": [
            {
                "name": sensitivity.candidates[i].name,
                "kind": sensitivity.candidates[i].kind,
                # None: the candidate alone changes no output (JSON has no infinity)
                "output_sqnr_db_alone": _round(sensitivity.alone_db[i]),
                "kept_float": i in kept,
                "members": list(sensitivity.candidates[i].members),
            }
            for i in order
        ],
    }


def _with_sensitivity(report: dict) -> None:
    """Each layer and activation entry gets its candidate's output SQNR alone and its decision."""
    sensitivity = report["sensitivity"]
    if sensitivity is None:
        return
    weights, groups = {}, {}
    for entry in sensitivity["candidates"]:
        for name in entry["members"]:
            (weights if entry["kind"] == "weight" else groups)[name] = entry
    for layer in report["layers"]:
        entry = weights.get(layer["name"])
        layer["sensitivity_db"] = entry["output_sqnr_db_alone"] if entry else None
        layer["kept_float_for_target"] = bool(entry and entry["kept_float"])
    for name, activation in report["activations"].items():
        entry = groups.get(name)
        activation["sensitivity_db"] = entry["output_sqnr_db_alone"] if entry else None
        activation["kept_float_for_target"] = bool(entry and entry["kept_float"])
        if entry and entry["kept_float"]:
            report["kept_float_activations"][name] = (
                f"output sensitivity: the accuracy target ({_target_text(sensitivity)}) keeps it float"
            )


def build_report(ctx: CompileContext, model_in, output: tuple[int, int]) -> dict:
    """The report of a compile; ``model_in`` is the loaded input (``ModelSource``), ``output``
    the output's (parameter count, bytes)."""
    facts, config = ctx.facts, ctx.config
    views = _layer_views(facts)
    qualities = [view.quality for view in views if view.quality is not None]
    activation_splits = facts.get(ACTIVATION_SPLITS, ActivationSplits()).splits
    weights_before = int(sum(view.layer.model_weight.size for view in views))
    weights_after = int(sum(np.prod(view.weight_shape_after) for view in views))
    params_before = _weight_count(model_in.proto)
    params_after, bytes_after = output
    calibration = facts.get(CALIBRATION)
    report = {
        "ocs_onnx_version": __version__,
        "source": ctx.source,
        "config": config.as_dict(),
        "normalization": {key: value for counts in ctx.statistics.values() for key, value in counts.items()},
        "layers": [layer_entry(view, config) for view in views],
        "kept_float": facts.get(KEPT_FLOAT, {}),
        "activations": _activation_entries(facts, config),
        "integer_ops": _integer_op_entries(facts),
        "kept_float_activations": _kept_float_activations(facts),
        "sensitivity": _sensitivity_entry(facts),
        "calibration": calibration.summary if calibration is not None else {},
        "onnxruntime": facts.get(VERIFICATION, {}),
        "totals": {
            "quantized_layers": len(views),
            "split_layers": sum(1 for view in views if view.splits),
            "channels_split": sum(len(view.splits) for view in views),
            "splits_folded": sum(1 for view in views if view.copies and view.copies != "run time"),
            "scales_raised_for_overflow": sum(view.scale.raised_for_overflow for view in views if view.scale is not None),
            "activations_split": len(activation_splits),
            "activation_channels_split": sum(len(s.channels) for s in activation_splits.values()),
            "quantized_weights_before": weights_before,
            "quantized_weights_after": weights_after,
            "weight_overhead": (weights_after / weights_before - 1.0) if weights_before else 0.0,
            "weight_sqnr_db": {
                "without_ocs": _round(combined_sqnr_db(qualities, "sqnr_without_ocs_db")),
                "with_ocs": _round(combined_sqnr_db(qualities, "sqnr_with_ocs_db")),
            },
            "parameters_before": params_before,
            "parameters_after": params_after,
            "model_bytes_before": model_in.bytes,
            "model_bytes_after": bytes_after,
        },
        "pass_seconds": {name: round(seconds, 4) for name, seconds in ctx.pass_seconds.items()},
        "warnings": ctx.warnings,
    }
    _with_sensitivity(report)
    return report


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n"


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not math.isfinite(value) else float(value)
    return str(value)


def _db(value) -> str:
    return "   exact" if value is None else f"{value:6.1f} dB"


def summary_text(report: dict) -> str:
    """A few lines for stderr: the per-layer table, then totals."""
    config = report["config"]
    rows = [("layer", "op", "weight", "split", "SQNR no OCS", "SQNR OCS")]
    for layer in report["layers"]:
        split = f"+{layer['channels_split']}" if layer["split"] else ("-" if not layer["not_split_reason"] else "no*")
        rows.append(
            (
                layer["name"],
                layer["op"],
                "x".join(map(str, layer["weight_shape"])),
                split,
                _db(layer["sqnr_db"]["without_ocs"]),
                _db(layer["sqnr_db"]["with_ocs"]),
            )
        )
    widths = [min(max(len(r[i]) for r in rows), 40) for i in range(len(rows[0]))]
    lines = ["  ".join(cell[:40].ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if any(layer["not_split_reason"] for layer in report["layers"]):
        lines.append("  no* = not splittable (reason in the JSON report)")
    totals = report["totals"]
    if config["reduce_range"] is True:
        lines.append(
            "8-bit weights use the reduced range +-63 (7-bit grid) everywhere (--reduce-range); without it, only the rows whose 16-bit pair sums could overflow get a coarser scale"
        )
    elif config["reduce_range"] == "auto" and totals["scales_raised_for_overflow"]:
        lines.append(
            f"{totals['scales_raised_for_overflow']} weight scales raised (coarser grid) so that onnxruntime's uint8 x int8 kernels cannot overflow "
            "their 16-bit pair sums on CPUs without VNNI; --no-reduce-range keeps the full +-127 grid"
        )
    hessian = sum(1 for layer in report["layers"] if layer["rounding"].startswith("hessian"))
    refined = sum(1 for layer in report["layers"] if layer["rounding"] == "hessian, quantized inputs")
    corrected = sum(1 for layer in report["layers"] if layer["bias_corrected"])
    if config["rounding"] == "hessian" or corrected:
        lines.append(
            f"weights rounded by GPTQ on their calibration inputs in {hessian} of {len(report['layers'])} layers"
            + (f" ({refined} again on the quantized model's inputs)" if refined else "")
            + (f", biases corrected in {corrected}" if corrected else "")
            + (" (the others: nearest, reasons in the JSON report)" if hessian < len(report["layers"]) and config["rounding"] == "hessian" else "")
        )
    abits = "none" if config["abits"] is None else config["abits"]
    lines.append(
        f"quantized {totals['quantized_layers']} layers at W{config['wbits']}A{abits} ({config['granularity']} scales), "
        f"split {totals['split_layers']} layers (+{totals['channels_split']} channels, ratio {config['ratio']}, {config['split']} split); "
        f"weights {totals['quantized_weights_before']:,} -> {totals['quantized_weights_after']:,} (+{100 * totals['weight_overhead']:.2f} %)"
    )
    sqnr = totals["weight_sqnr_db"]
    split_layers = totals["split_layers"]
    if split_layers:
        lines.append(
            f"OCS copies computed by their producer for {totals['splits_folded']} of {split_layers} split layers "
            "(the others copied at run time)"
        )
    lines.append(
        f"weight SQNR, all layers: {_db(sqnr['without_ocs']).strip()} without OCS, {_db(sqnr['with_ocs']).strip()} with OCS"
    )
    if totals["activations_split"]:
        lines.append(
            f"activation OCS: split {totals['activations_split']} activations "
            f"(+{totals['activation_channels_split']} channels, act ratio {config['act_ratio']})"
        )
    if report["kept_float"]:
        lines.append(f"kept float: {len(report['kept_float'])} weighted layers (reasons in the report)")
    sensitivity = report["sensitivity"]
    if sensitivity is not None:
        lines.append(_sensitivity_line(sensitivity))
    calib = report["calibration"]
    if calib:
        lines.append(f"calibration: {calib.get('samples', 0)} samples, {calib.get('source')}")
    ort_info = report["onnxruntime"]
    if ort_info:
        line = f"onnxruntime {ort_info['onnxruntime_version']}: {ort_info['integer_kernels']} integer kernels for {ort_info['quantized_layers']} quantized layers"
        sqnr = ort_info.get("output_sqnr_db")
        if sqnr:
            line += "; output SQNR vs float " + ", ".join(f"{k} {_db(v).strip()}" for k, v in sqnr.items())
        lines.append(line)
    lines.append(f"model size {totals['model_bytes_before']:,} -> {totals['model_bytes_after']:,} bytes")
    return "\n".join(lines)


def _sensitivity_line(sensitivity: dict) -> str:
    ranked = [c for c in sensitivity["candidates"] if c["output_sqnr_db_alone"] is not None][:3]
    line = (
        f"sensitivity on {sensitivity['held_out_samples']} held-out samples: output SQNR "
        f"{_db(sensitivity['output_sqnr_db']['as_quantized']).strip()} as quantized; most sensitive: "
        + ", ".join(f"{c['name']} ({c['kind']}, {c['output_sqnr_db_alone']:.1f} dB alone)" for c in ranked)
    )
    if sensitivity["target_sqnr_db"] is not None or sensitivity["metric"] is not None:
        kept = [c for c in sensitivity["candidates"] if c["kept_float"]]
        weights = sum(1 for c in kept if c["kind"] == "weight")
        line += (
            f"; {_target_text(sensitivity)}: kept float {weights} weights and {len(kept) - weights} activation groups, "
            f"output SQNR {_db(sensitivity['output_sqnr_db']['final']).strip()}"
        )
        metric = sensitivity["metric"]
        if metric is not None:
            line += f", metric {metric['final']:.4g} (float {metric['float']:.4g}, as quantized {metric['as_quantized']:.4g})"
    return line


def _target_text(sensitivity: dict) -> str:
    parts = []
    if sensitivity["target_sqnr_db"] is not None:
        parts.append(f"--target-sqnr {sensitivity['target_sqnr_db']:g} dB")
    if sensitivity["metric"] is not None:
        parts.append(f"metric drop at most {sensitivity['metric']['max_drop']:g}")
    return " and ".join(parts)

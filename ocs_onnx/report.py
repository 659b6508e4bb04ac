"""The compile report: a JSON document for pipelines and a short table for people."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx

from . import __version__
from .context import CompileContext, LayerPlan


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


def combined_sqnr_db(plans: list[LayerPlan], attribute: str) -> float | None:
    """SQNR of all quantized weights taken together: total signal energy over total noise."""
    signal = noise = 0.0
    for plan in plans:
        energy = plan.weight_energy
        if energy is None:
            energy = float(np.sum(np.square(plan.original_weight, dtype=np.float64)))
        value = getattr(plan, attribute)
        signal += energy
        noise += 0.0 if value is None else energy / 10 ** (value / 10)
    return None if noise == 0.0 or signal == 0.0 else 10 * math.log10(signal / noise)


def layer_entry(plan: LayerPlan, ctx: CompileContext) -> dict:
    original = plan.original_weight
    split_channels = plan.channel_origins[original.shape[plan.weight_in_axis] :] if plan.channel_origins else []
    model_shape = list(original.shape)
    model_shape[plan.weight_in_axis] -= len(plan.activation_copies)
    return {
        "name": plan.name,
        "op": plan.op,
        "weight_shape": model_shape,
        "weight_shape_after": list(plan.weight.shape) if plan.splits else list(original.shape),
        "split": bool(plan.splits),
        "not_split_reason": plan.not_split_reason,
        "channels_split": len(plan.splits),
        "split_channels": [int(c) for c in split_channels],
        "activation_copies": [int(c) for c in plan.activation_copies],
        "bits": ctx.config.weight_bits,
        "granularity": ctx.config.granularity,
        "scale": _scale_value(plan.scale) if plan.scale is not None else None,
        "clip": {
            "method": ctx.config.wclip,
            "threshold": _scale_value(plan.clip_threshold) if plan.clip_threshold is not None else None,
            "max_abs": _scale_value(plan.max_abs) if plan.max_abs is not None else None,
        },
        "sqnr_db": {"without_ocs": _round(plan.sqnr_without_ocs_db), "with_ocs": _round(plan.sqnr_with_ocs_db)},
    }


def activation_entry(name: str, qp, ctx: CompileContext) -> dict:
    source = ctx.activations[name]
    lo, hi = ctx.activation_ranges[source]
    split = ctx.activation_splits.get(source)
    return {
        "scale": qp.scale,
        "zero_point": qp.zero_point,
        "type": np.dtype(qp.dtype).name,
        "shares_parameters_of": source if source != name else None,
        "range": [lo, hi],
        "clip": {
            "method": ctx.config.aclip,
            "threshold": ctx.activation_clip_thresholds.get(source),
            "max_abs": max(abs(lo), abs(hi)),
            "range": list(ctx.activation_clipped_ranges[source]),
        },
        "split": {"of": split.tensor, "channels": split.channels} if split is not None else None,
        "sqnr_db": _round(ctx.activation_sqnr_db.get(source)),
    }


def build_report(ctx: CompileContext, model_in, output: tuple[int, int]) -> dict:
    """The report of a compile; ``model_in`` is the loaded input (``ModelSource``), ``output``
    the output's (parameter count, bytes)."""
    layers = [layer_entry(plan, ctx) for plan in ctx.layers]
    weights_before = int(sum(p.model_weight_size for p in ctx.layers))
    weights_after = int(sum(np.prod(p.weight.shape if p.splits else p.original_weight.shape) for p in ctx.layers))
    params_before = _weight_count(model_in.proto)
    params_after, bytes_after = output
    activations = {name: activation_entry(name, qp, ctx) for name, qp in ctx.activation_qparams.items()}
    return {
        "ocs_onnx_version": __version__,
        "source": ctx.source,
        "config": ctx.config.as_dict(),
        "normalization": ctx.normalization,
        "layers": layers,
        "kept_float": ctx.kept_float,
        "activations": activations,
        "calibration": ctx.calibration,
        "onnxruntime": ctx.verification,
        "totals": {
            "quantized_layers": len(ctx.layers),
            "split_layers": sum(1 for p in ctx.layers if p.splits),
            "channels_split": sum(len(p.splits) for p in ctx.layers),
            "activations_split": len(ctx.activation_splits),
            "activation_channels_split": sum(len(s.channels) for s in ctx.activation_splits.values()),
            "quantized_weights_before": weights_before,
            "quantized_weights_after": weights_after,
            "weight_overhead": (weights_after / weights_before - 1.0) if weights_before else 0.0,
            "weight_sqnr_db": {
                "without_ocs": _round(combined_sqnr_db(ctx.layers, "sqnr_without_ocs_db")),
                "with_ocs": _round(combined_sqnr_db(ctx.layers, "sqnr_with_ocs_db")),
            },
            "parameters_before": params_before,
            "parameters_after": params_after,
            "model_bytes_before": model_in.bytes,
            "model_bytes_after": bytes_after,
        },
        "pass_seconds": {name: round(seconds, 4) for name, seconds in ctx.pass_seconds.items()},
        "warnings": ctx.warnings,
    }


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
    if config["reduce_range"]:
        lines.append(
            "8-bit weights use the reduced range +-63 (7-bit grid) so onnxruntime's uint8 x int8 kernels cannot overflow on CPUs without VNNI; --no-reduce-range keeps +-127"
        )
    abits = "none" if config["abits"] is None else config["abits"]
    lines.append(
        f"quantized {totals['quantized_layers']} layers at W{config['wbits']}A{abits} ({config['granularity']} scales), "
        f"split {totals['split_layers']} layers (+{totals['channels_split']} channels, ratio {config['ratio']}, {config['split']} split); "
        f"weights {totals['quantized_weights_before']:,} -> {totals['quantized_weights_after']:,} (+{100 * totals['weight_overhead']:.2f} %)"
    )
    sqnr = totals["weight_sqnr_db"]
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

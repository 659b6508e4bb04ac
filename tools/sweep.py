"""Clip methods and OCS ratios across bit widths, in the layout of the paper's Tables 2 and 3.

    python tools/sweep.py [--model demo] [--table weights|activations|both] [--granularity tensor]
                          [--out sweep.md]

Table 2 (``weights``): rows are weight bits 8 to 4 with 8-bit activations; columns are the
weight clip methods without OCS (none, mse, aciq, kl), the best of them, weight OCS at
r = 0.01 / 0.02 / 0.05 without clipping, and OCS + the best clip method at the best of those
ratios. Table 3 (``activations``): rows are activation bits 8 to 4 with 8-bit weights and no
weight OCS; columns are the activation clip methods, activation OCS (``--act-ratio``) and
activation OCS + the best clip. Every cell compiles the model in-process with ocs-onnx and
evaluates the result with the model's own task metric in onnxruntime.

A model is a ``SweepModel``: its ONNX file, its calibration data and an evaluation function
returning named metrics. ``--model demo`` is the digits CNN of ``models/demo``; another model
plugs in with ``--model package.module:attribute`` naming a ``SweepModel`` (or a function
returning one).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/

import ocs_onnx  # noqa: E402
from models import digits  # noqa: E402
from ocs_onnx.quant import sqnr_db  # noqa: E402

BITS = (8, 7, 6, 5, 4)
CLIP_METHODS = ("none", "mse", "aciq", "kl")
OCS_RATIOS = (0.01, 0.02, 0.05)


@dataclass
class SweepModel:
    name: str
    model: Path
    calibration: Path
    # The compiled model -> {metric name: value}. "Best" ranks by the first metric, then the next.
    evaluate: Callable[[onnx.ModelProto | Path], dict[str, float]]
    higher_is_better: bool = True


def demo_model() -> SweepModel:
    with np.load(digits.EVALUATION) as data:
        images, labels = data["image"], data["label"]
    reference = _run(digits.MODEL, images)

    def evaluate(model) -> dict[str, float]:
        logits = _run(model, images)
        return {
            "top-1 %": 100 * float(np.mean(logits.argmax(1) == labels)),
            "logit SQNR dB": sqnr_db(reference, logits),
        }

    return SweepModel("digits CNN (models/demo)", digits.MODEL, digits.CALIBRATION, evaluate)


def _run(model: onnx.ModelProto | Path, images: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def load_sweep_model(spec: str) -> SweepModel:
    if spec == "demo":
        return demo_model()
    module_name, _, attribute = spec.partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    return target() if callable(target) and not isinstance(target, SweepModel) else target


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


class Sweep:
    def __init__(self, subject: SweepModel, granularity: str):
        self.subject = subject
        self.granularity = granularity
        self.compiles = 0

    def cell(self, **options) -> dict[str, float]:
        model, _ = ocs_onnx.compile(
            str(self.subject.model),
            calib_data=self.subject.calibration,
            granularity=self.granularity,
            # OCS as the paper measures it: every split that lowers the error, however little
            # (the default's --min-split-gain weighs run time, which these tables do not)
            # and with nearest rounding, as the paper's tables are
            **{"min_split_gain_db": 0.0, "rounding": "nearest", **options},
        )
        self.compiles += 1
        return self.subject.evaluate(model)

    def rank(self, metrics: dict[str, float]) -> tuple:
        """Sort key, best first: the metrics in order (later ones break ties of earlier ones,
        which matters when a task metric saturates)."""
        sign = -1.0 if self.subject.higher_is_better else 1.0
        return tuple(sign * v if v is not None and math.isfinite(v) else math.inf for v in metrics.values())

    def best(self, results: dict):
        """The key of the best result; the first one listed among equals."""
        return min(results, key=lambda key: self.rank(results[key]))

    def row(self, fixed: dict, clip_flag: str, ratio_flag: str) -> list:
        """One row: clip methods, best clip, OCS ratios, OCS + best clip, as (metrics, note)
        pairs in column order."""
        clips = {m: self.cell(**{**fixed, clip_flag: m, ratio_flag: 0.0}) for m in CLIP_METHODS}
        best_clip = self.best(clips)
        ratios = {r: self.cell(**{**fixed, ratio_flag: r}) for r in OCS_RATIOS}
        best_ratio = self.best(ratios)
        combined = self.cell(**{**fixed, clip_flag: best_clip, ratio_flag: best_ratio})
        cells = [(clips[m], "") for m in CLIP_METHODS]
        cells.append((clips[best_clip], best_clip))
        cells += [(ratios[r], "") for r in OCS_RATIOS]
        cells.append((combined, f"{best_clip}, r={best_ratio}"))
        return cells


def _format(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def table(sweep: Sweep, kind: str, metrics: list[str]) -> list[str]:
    # As in the paper, nothing is clipped unless a column says so (ocs-onnx clips activations by default).
    unclipped = {"wclip": "none", "aclip": "none"}
    if kind == "weights":  # Table 2: weight bits vary, activations at 8 bits, no activation OCS
        title, clip_flag, ratio_flag = "weight", "wclip", "ratio"
        rows = [(f"W{b}A8", {**unclipped, "wbits": b, "abits": 8, "act_ratio": 0.0}) for b in BITS]
        rows[0] = ("W8A8 *", rows[0][1])
    else:  # Table 3: activation bits vary, weights at 8 bits, no weight OCS
        title, clip_flag, ratio_flag = "activation", "aclip", "act_ratio"
        rows = [(f"W8A{b}", {**unclipped, "wbits": 8, "abits": b, "ratio": 0.0}) for b in BITS]
        rows[0] = ("W8A8 *", rows[0][1])
    header = (
        ["bits"]
        + [f"clip {m}" for m in CLIP_METHODS]
        + ["best clip"]
        + [f"OCS r={r}" for r in OCS_RATIOS]
        + ["OCS + best clip"]
    )
    results = [(label, sweep.row(fixed, clip_flag, ratio_flag)) for label, fixed in rows]
    lines = []
    for metric in metrics:
        lines += [
            f"**{title} quantization, {metric}** ({sweep.granularity} weight scales)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for label, cells in results:
            text = [_format(m[metric]) + (f" ({note})" if note else "") for m, note in cells]
            lines.append(f"| {label} | " + " | ".join(text) + " |")
        lines.append("")
    lines += [
        "\\* At W8A8 weights use the reduced +-63 grid by default (see the README's defaults): 7-bit weights.",
        "",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or package.module:attribute naming a SweepModel")
    parser.add_argument("--table", choices=("weights", "activations", "both"), default="both")
    parser.add_argument("--granularity", choices=("tensor", "channel"), default="tensor")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    subject = load_sweep_model(args.model)
    start = time.perf_counter()
    float_metrics = subject.evaluate(subject.model)
    metrics = list(float_metrics)
    sweep = Sweep(subject, args.granularity)
    lines = [
        f"{subject.name}, float: " + ", ".join(f"{k} {_format(v)}" for k, v in float_metrics.items()) + ".",
        "",
    ]
    kinds = ("weights", "activations") if args.table == "both" else (args.table,)
    for kind in kinds:
        lines += table(sweep, kind, metrics)
    lines.append(f"{sweep.compiles} compiles in {time.perf_counter() - start:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each W8A8 weight range costs: accuracy, exactness and latency of the per-row overflow
bound (the default), --reduce-range (+-63 everywhere) and --no-reduce-range (+-127 everywhere).

For each model and each choice (W8A8, OCS ratio 0.02, the rest default): the task metric as this
machine's onnxruntime computes it, the task metric of the QDQ arithmetic the model specifies
(graph optimizations off: what a CPU whose kernels cannot overflow computes), the verify pass's
agreement of the integer kernels with that arithmetic (output SQNR, dB; an overflow shows as a
few dB to a few tens), the share of weight rows whose scale the bound raised and the median of
their grid's levels (max|w| / scale; 127 is the full grid), and the latency against the float
model (one thread, batch 1, interleaved rounds in one process).

    python tools/weight_range.py --models demo ppocrv5-rec ppocrv5-det ppocrv5-cls ddddocr-det
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/
sys.path.append(str(Path(__file__).resolve().parent))  # tools/, for bench.py's model registry

import ocs_onnx  # noqa: E402
from bench import fixed_batch, latency_ratios, qdq_arithmetic_session, print_per_model, registry  # noqa: E402

CHOICES = (
    ("per-row bound (default)", {}),
    ("--reduce-range (+-63)", {"reduce_range": True}),
    ("--no-reduce-range (+-127)", {"reduce_range": False}),
)


def grid_levels(report: dict) -> tuple[float, float]:
    """(share of weight rows whose scale was raised, median of every row's levels max|w| / scale)."""
    levels, raised, rows = [], 0, 0
    for layer in report["layers"]:
        peak, scale = np.atleast_1d(layer["clip"]["max_abs"]), np.atleast_1d(layer["scale"])
        levels.append(np.broadcast_to(peak / np.broadcast_to(scale, peak.shape), peak.shape))
        raised += layer["scales_raised_for_overflow"]
        rows += len(np.atleast_1d(layer["scale"]))
    return raised / max(rows, 1), float(np.median(np.concatenate(levels)))


def measure(name: str, work: Path, rounds: int) -> list[str]:
    subject = registry()[name](work)
    float_metric = subject.evaluate(Path(subject.model))
    headline = next(iter(float_metric))
    lines = [f"{subject.name}: float {headline} {float_metric[headline]:.1f}"]
    paths, rows = [Path(subject.model)], []
    for label, options in CHOICES:
        output = work / f"{len(paths)}.onnx"
        _, report = ocs_onnx.compile_file(
            subject.model, output, calib_data=subject.calibration, wbits=8, abits=8,
            min_kernel_agreement_db=None, **options,
        )  # fmt: skip
        agreement = report["onnxruntime"].get("integer_kernels_vs_qdq_sqnr_db") or {}
        raised, median_levels = grid_levels(report)
        rows.append([
            label,
            f"{subject.evaluate(output)[headline]:.1f}",
            f"{subject.evaluate(qdq_arithmetic_session(output))[headline]:.1f}",
            f"{min(agreement.values()):.0f}" if agreement else "-",
            f"{100 * raised:.0f} %, {median_levels:.0f}",
        ])  # fmt: skip
        paths.append(output)
    feed = {k: v[: fixed_batch(subject.model) or 1] for k, v in subject.latency_feed.items()}
    for row, ratio in zip(rows, latency_ratios(paths, feed, threads=1, rounds=rounds)[1:]):
        row.append(f"{ratio:.2f}")
    lines += [f"| {subject.name} | " + " | ".join(row) + " |" for row in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted(registry()))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} cores")
    print(
        "| model | weight range | task metric, this CPU | task metric, QDQ arithmetic | kernels vs QDQ dB "
        "| rows raised, median levels | latency vs float |"
    )
    print("|---|---|---|---|---|---|---|")
    print_per_model(args.models, lambda name, work: measure(name, work, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of compiled models against their float model, measured in one process.

For each model (the demo and, with the bench extra, PP-OCRv5 rec/cls/det and ddddocr-det from
the zoo) it compiles the configurations below and onnxruntime's own quantize_static (W8A8 QDQ,
per-channel, MinMax; the bench's peer), then times every session in interleaved rounds (float,
then each compiled model, round after round, so that the machine's drift hits all alike) and
prints the median of each model's time over the float model's time in the same round. Two
settings: one thread at batch 1, and all cores at batch 8 (a model whose input fixes its batch
size, as ddddocr-det's fixes 1, runs at that size in both). It also prints how many split layers
had their copies computed by their producer, and (``--metrics``) the task metric of each model.

    python tools/latency.py                      # the demo
    python tools/latency.py --models demo ppocrv5-cls ppocrv5-rec ppocrv5-det ddddocr-det --metrics
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
from ocs_onnx.passes.verify import optimized_op_counts  # noqa: E402
from bench import ORT_RUNS, fixed_batch, latency_ratios, ort_quantize, print_per_model, registry  # noqa: E402

# (label, compile options): ratio 0 is the baseline OCS is judged against.
CONFIGS = [
    ("W8A8 ratio 0", dict(ratio=0.0)),
    ("W8A8 ratio 0.02 (default)", dict(ratio=0.02)),
    ("W8A8 ratio 0.02, layers only", dict(ratio=0.02, int8_ops=False)),
    ("W8A8 ratio 0.02, copies at run time", dict(ratio=0.02, fold_ocs_copies=False)),
    ("W6A8 ratio 0.02", dict(wbits=6, ratio=0.02)),
]
SETTINGS = [("1 thread, batch 1", 1, 1), ("all cores, batch 8", 0, 8)]


def _batch(feed: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate([array] * -(-size // len(array)))[:size] for name, array in feed.items()}


def kernel_counts(path: Path) -> str:
    """'integer / float' nodes of the graph onnxruntime optimizes the model into: integer kernels
    (QLinear*, QGemm, MatMulIntegerToFloat, ...), and the float compute nodes left (Q/DQ,
    layout reorders and shape ops not counted)."""
    _, ops = optimized_op_counts(str(path))
    bookkeeping = {"QuantizeLinear", "DequantizeLinear", "ReorderInput", "ReorderOutput", "Shape", "Reshape",
                   "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}  # fmt: skip
    integer = sum(n for op, n in ops.items() if op.startswith("QLinear") or op in INTEGER_KERNELS)
    float_ops = sum(n for op, n in ops.items() if op not in bookkeeping) - integer
    return f"{integer} / {float_ops}"


INTEGER_KERNELS = {"QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"}


def measure(name: str, work: Path, rounds: int, metrics: bool) -> list[str]:
    subject = registry()[name](work)
    paths, rows = [Path(subject.model)], []
    # the peer: onnxruntime's own quantize_static at W8A8 (QDQ, per-channel, MinMax)
    label, method, weight_type, reduce = ORT_RUNS[0]
    peer = ort_quantize(subject, work, label, method, weight_type, reduce)
    if peer.ok:
        rows.append([f"onnxruntime quantize_static W8A8 {label}", "-", "-", kernel_counts(peer.output)])
        paths.append(peer.output)
    else:
        print(f"{subject.name}: onnxruntime quantize_static failed: {peer.error}", file=sys.stderr)
    for label, options in CONFIGS:
        output = work / f"{name}-{len(paths)}.onnx"
        _, report = ocs_onnx.compile_file(subject.model, output, calib_data=subject.calibration, **options)
        totals = report["totals"]
        folded = f"{totals['splits_folded']} of {totals['split_layers']}" if totals["split_layers"] else "-"
        rows.append([label, folded, f"{100 * totals['weight_overhead']:.2f}", kernel_counts(output)])
        paths.append(output)
    lines = []
    fixed = fixed_batch(subject.model)  # a model whose input fixes its batch size runs at that size
    for setting, threads, batch in SETTINGS:
        ratios = latency_ratios(paths, _batch(subject.latency_feed, fixed or batch), threads, rounds)
        for row, ratio in zip(rows, ratios[1:]):
            row.append(f"{ratio:.2f}")
    if metrics:
        float_metric = subject.evaluate(Path(subject.model))
        headline = next(iter(float_metric))
        lines.append(f"{subject.name}: float {headline} {float_metric[headline]:.1f}")
        for row, path in zip(rows, paths[1:]):
            row.append(f"{subject.evaluate(path)[headline]:.1f}")
    for row in rows:
        lines.append(f"| {subject.name} | " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted(registry()))
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per setting")
    parser.add_argument("--metrics", action="store_true", help="also evaluate each model's task metric")
    args = parser.parse_args(argv)
    header = "| model | config | splits folded | weight overhead % | integer / float nodes | " + " | ".join(
        f"latency vs float, {s[0]}" for s in SETTINGS
    )
    header += " | task metric |" if args.metrics else " |"
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} cores, median of {args.rounds} interleaved rounds")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print_per_model(args.models, lambda name, work: measure(name, work, args.rounds, args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

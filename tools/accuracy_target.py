"""What ``--target-sqnr`` buys and costs: for each model, the default W8A8 compile and the same
compile with each target (output SQNR against the float model on the held-out calibration
samples, dB), with the task metric, the candidates kept float, the output SQNR reached, the
analysis time over the plain compile's (same run), latency over the float model's (one thread,
batch 1, interleaved rounds; onnxruntime's own quantize_static W8A8 QDQ output, the bench's peer,
timed and scored in the same run) and the model size.

A target given as ``auto`` is the output SQNR that weight-only quantization (``--abits none``)
reaches on the same held-out samples: W8A8 held to weight-only W8's output error.

    python tools/accuracy_target.py --models demo ppocrv5-rec [--targets auto 10 15] [--rounds 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/
sys.path.append(str(Path(__file__).resolve().parent))  # tools/, for bench.py's model registry

import ocs_onnx  # noqa: E402
from bench import ORT_RUNS, fixed_batch, latency_ratios, ort_quantize, print_per_model, registry  # noqa: E402


def _timed_compile(subject, output: Path, **options) -> tuple[dict, float]:
    start = time.perf_counter()
    _, report = ocs_onnx.compile_file(subject.model, output, calib_data=subject.calibration, **options)
    return report, time.perf_counter() - start


def measure(name: str, work: Path, targets: list[str], rounds: int) -> list[str]:
    subject = registry()[name](work)
    metric = None
    plain_path = work / f"{name}_plain.onnx"
    plain, plain_seconds = _timed_compile(subject, plain_path, sensitivity=True)
    analysis_seconds = plain["pass_seconds"]["analyze-sensitivity"]
    plain_seconds -= analysis_seconds  # the compile without the analysis
    rows, paths = [], [plain_path]
    scores = subject.evaluate(plain_path)
    metric = next(iter(scores))
    sensitivity = plain["sensitivity"]
    rows.append(["default W8A8", f"{scores[metric]:.1f}", "0 / 0", f"{sensitivity['output_sqnr_db']['as_quantized']:.1f}",
                 f"{analysis_seconds / plain_seconds:.2f}", None, f"{plain['totals']['model_bytes_after']:,}"])  # fmt: skip
    for target in targets:
        if target == "auto":
            weight_only, _ = _timed_compile(subject, work / f"{name}_weight_only.onnx", abits=None, sensitivity=True)
            value = weight_only["sensitivity"]["output_sqnr_db"]["as_quantized"]
            label = f"--target-sqnr {value:.1f} (weight-only W8's)"
        else:
            value, label = float(target), f"--target-sqnr {target}"
        path = work / f"{name}_target_{len(paths)}.onnx"
        try:
            report, seconds = _timed_compile(subject, path, target_sqnr_db=value)
        except ocs_onnx.OcsError as exc:
            rows.append([label, f"exit {exc.exit_code}: {exc.message[:80]}", "", "", "", "", ""])
            continue
        sensitivity = report["sensitivity"]
        kept = [c for c in sensitivity["candidates"] if c["kept_float"]]
        weights = sum(1 for c in kept if c["kind"] == "weight")
        scores = subject.evaluate(path)
        rows.append([label, f"{scores[metric]:.1f}", f"{weights} / {len(kept) - weights}",
                     f"{sensitivity['output_sqnr_db']['final']:.1f}",
                     f"{report['pass_seconds']['analyze-sensitivity'] / plain_seconds:.2f}", len(paths),
                     f"{report['totals']['model_bytes_after']:,}"])  # fmt: skip
        paths.append(path)
    label, method, weight_type, reduce = ORT_RUNS[0]
    peer = ort_quantize(subject, work, label, method, weight_type, reduce)
    if peer.ok:
        rows.insert(0, [f"onnxruntime quantize_static W8A8 {label}", f"{subject.evaluate(peer.output)[metric]:.1f}",
                        "", "", "", len(paths), f"{peer.output.stat().st_size:,}"])  # fmt: skip
        paths.append(peer.output)
    batch = fixed_batch(onnx.load(str(subject.model), load_external_data=False)) or 1
    feed = {k: v[:batch] for k, v in subject.latency_feed.items()}
    ratios = latency_ratios([Path(subject.model), *paths], feed, threads=1, rounds=rounds)[1:]
    header = f"| {subject.name} | {metric} | weights / activation groups kept float | output SQNR, held out (dB) | analysis time / plain compile | latency / float | bytes |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        row[5] = f"{ratios[row[5] or 0]:.2f}" if isinstance(row[5], int) or row[5] is None else row[5]
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted(registry()))
    parser.add_argument("--targets", nargs="+", default=["auto"], help="dB values, or 'auto'")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print_per_model(args.models, lambda name, work: measure(name, work, args.targets, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

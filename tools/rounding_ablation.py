"""What each part is worth at low bit widths: nearest rounding, OCS, Hessian rounding (GPTQ, on
the float model's inputs or then also on the quantized model's), Hessian rounding with OCS, and
bias correction on top, in the layout of the paper's Table 2.

For each model, granularity and weight width (activations 8-bit, the rest default): the task
metric of every combination, and the compile time of each relative to the first column's
compile (nearest rounding without OCS, unless ``--only`` leaves it out) in the same run (in
brackets).

    python tools/rounding_ablation.py --models demo ppocrv5-rec ppocrv5-det ppocrv5-cls \\
        [--bits 8 6 5 4] [--granularity channel tensor] [--only COLUMN ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/
sys.path.append(str(Path(__file__).resolve().parent))  # tools/, for bench.py's model registry

import ocs_onnx  # noqa: E402
from bench import print_per_model, registry  # noqa: E402

# (column, options): OCS at the ratio of the paper's tables, every split kept (as the sweep does)
# "float inputs": GPTQ on the float model's layer inputs only (the default); "quantized inputs":
# then again on the quantized model's (--rounding-inputs quantized).
COMBINATIONS = (
    ("nearest", {"ratio": 0.0, "rounding": "nearest"}),
    ("OCS 0.02", {"ratio": 0.02, "rounding": "nearest"}),
    ("Hessian, float inputs", {"ratio": 0.0, "rounding": "hessian", "rounding_inputs": "float"}),
    ("Hessian, quantized inputs", {"ratio": 0.0, "rounding": "hessian", "rounding_inputs": "quantized"}),
    ("Hessian, float inputs + OCS 0.02", {"ratio": 0.02, "rounding": "hessian", "rounding_inputs": "float"}),
    ("Hessian, quantized inputs + OCS 0.02", {"ratio": 0.02, "rounding": "hessian", "rounding_inputs": "quantized"}),
    ("Hessian, float inputs + OCS 0.02 + bias corr.", {"ratio": 0.02, "rounding": "hessian", "bias_correction": True}),
)


def measure(name: str, work: Path, bits: list[int], granularities: list[str], combinations=COMBINATIONS) -> list[str]:
    subject = registry()[name](work)
    float_metric = subject.evaluate(Path(subject.model))
    headline = next(iter(float_metric))
    lines = [f"{subject.name}: float {headline} {float_metric[headline]:.1f}"]
    for granularity in granularities:
        for wbits in bits:
            cells, baseline = [], None
            for _, options in combinations:
                output = work / "model.onnx"
                start = time.perf_counter()
                ocs_onnx.compile_file(
                    subject.model, output, calib_data=subject.calibration, wbits=wbits, abits=8,
                    granularity=granularity, min_split_gain_db=0.0, min_kernel_agreement_db=None, **options,
                )  # fmt: skip
                seconds = time.perf_counter() - start
                baseline = baseline or seconds
                cells.append(f"{subject.evaluate(output)[headline]:.1f} ({seconds / baseline:.1f}x)")
            lines.append(f"| {subject.name} | {granularity} | W{wbits}A8 | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted(registry()))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 5, 4])
    parser.add_argument("--granularity", nargs="+", default=["channel", "tensor"], choices=["channel", "tensor"])
    parser.add_argument("--only", nargs="+", choices=[label for label, _ in COMBINATIONS], help="these columns only")
    args = parser.parse_args(argv)
    chosen = [c for c in COMBINATIONS if args.only is None or c[0] in args.only]
    print("| model | scales | bits | " + " | ".join(label for label, _ in chosen) + " |")
    print("|---|---|---|" + "---|" * len(chosen))
    print_per_model(args.models, lambda name, work: measure(name, work, args.bits, args.granularity, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What cross-layer equalization (``--equalize``) does to each bench model's task metric at
W8A8 and W6A8, with per-channel and per-tensor weight scales (everything else default), and how
many layer pairs it rescaled.

    python tools/equalization.py --models demo ppocrv5-cls ppocrv5-rec ppocrv5-det
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/
sys.path.append(str(Path(__file__).resolve().parent))  # tools/, for bench.py's model registry

import ocs_onnx  # noqa: E402
from bench import print_per_model, registry  # noqa: E402


def measure(name: str, work: Path, bits: list[int]) -> list[str]:
    subject = registry()[name](work)
    lines = []
    for granularity in ("channel", "tensor"):
        for wbits in bits:
            row, pairs = [], 0
            for equalize in (False, True):
                path = work / f"{name}_{granularity}_{wbits}_{equalize}.onnx"
                _, report = ocs_onnx.compile_file(subject.model, path, calib_data=subject.calibration, wbits=wbits,
                                                  granularity=granularity, equalize=equalize)  # fmt: skip
                scores = subject.evaluate(path)
                metric = next(iter(scores))
                row.append(f"{scores[metric]:.1f}")
                pairs = report["normalization"].get("pairs_equalized", pairs)
            if not lines:
                lines += [f"| {subject.name} | scales | W | {metric} | with --equalize | pairs |", "|---|---|---|---|---|---|"]
            lines.append(f"| | {granularity} | W{wbits}A8 | {row[0]} | {row[1]} | {pairs} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted(registry()))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    args = parser.parse_args(argv)
    print_per_model(args.models, lambda name, work: measure(name, work, args.bits))
    return 0


if __name__ == "__main__":
    sys.exit(main())

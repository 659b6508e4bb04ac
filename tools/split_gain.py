"""What --min-split-gain trades: task metric and latency of OCS at several minimum gains.

For each model and weight width (W8, W6, W4; activations 8-bit), it compiles OCS ratio 0 and
ratio 0.02 with ``--min-split-gain`` 0, 0.5 and 1 dB, evaluates each compiled model's task
metric, and times them against the float model in one process (interleaved rounds, median of
each model's time over the float model's in the same round; one thread, batch 1).

    python tools/split_gain.py --models ppocrv5-rec ppocrv5-det ppocrv5-cls demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/
sys.path.append(str(Path(__file__).resolve().parent))  # tools/, for bench.py's model registry

import ocs_onnx  # noqa: E402
from bench import latency_ratios, print_per_model, registry  # noqa: E402

BITS = (8, 6, 4)
# (OCS ratio, minimum split gain in dB)
SETTINGS = ((0.0, 0.0), (0.02, 0.0), (0.02, 0.5), (0.02, 1.0))


def measure(name: str, work: Path, rounds: int) -> list[str]:
    subject = registry()[name](work)
    float_metric = subject.evaluate(Path(subject.model))
    headline = next(iter(float_metric))
    lines = [f"{subject.name}: float {headline} {float_metric[headline]:.1f}"]
    feed = {k: v[:1] for k, v in subject.latency_feed.items()}
    for bits in BITS:
        paths, cells = [Path(subject.model)], []
        for ratio, gain in SETTINGS:
            output = work / f"w{bits}-r{ratio}-g{gain}.onnx"
            _, report = ocs_onnx.compile_file(
                subject.model, output, calib_data=subject.calibration, wbits=bits, ratio=ratio,
                min_split_gain_db=gain, min_kernel_agreement_db=None, rounding="nearest",
            )
            metric = subject.evaluate(output)[headline]
            split = report["totals"]["split_layers"]
            cells.append(f"{metric:.1f}" + (f" ({split})" if ratio else ""))
            paths.append(output)
        ratios = latency_ratios(paths, feed, threads=1, rounds=rounds)[1:]
        row = [f"{cell}, {ratio:.2f}x" for cell, ratio in zip(cells, ratios)]
        lines.append(f"| {subject.name} | W{bits} | " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo"], choices=sorted(registry()))
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    print("| model | bits | ratio 0 | gain 0 | gain 0.5 dB | gain 1 dB |")
    print("|---|---|---|---|---|---|")
    print_per_model(args.models, lambda name, work: measure(name, work, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

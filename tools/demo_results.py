"""Accuracy of the demo model (models/demo/digits_cnn.onnx) compiled at several weight bit
widths, with and without OCS, for both weight-scale granularities. Writes a markdown table.

    python tools/demo_results.py [--out results.md]

Each row compiles the model in-process with ocs-onnx (activations uint8, 8 bits, unclipped, calibrated on
models/demo/digits_calib.npz) and evaluates it with onnxruntime on the held-out set
(models/demo/digits_eval.npz). Besides top-1 accuracy, the table shows the SQNR of the logits
against the float model on the whole evaluation set: accuracy on this easy task saturates,
the logit SQNR shows how much of the float model's output each setting keeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/

import ocs_onnx  # noqa: E402
from models import digits  # noqa: E402
from ocs_onnx.quant import sqnr_db  # noqa: E402

BITS = (8, 6, 5, 4, 3)
RATIOS = (0.0, 0.02)


def logits(model: onnx.ModelProto | Path, images: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    with np.load(digits.EVALUATION) as data:
        images, labels = data["image"], data["label"]
    reference = logits(digits.MODEL, images)
    float_accuracy = 100 * np.mean(reference.argmax(1) == labels)
    lines = [
        f"Demo model: float top-1 accuracy {float_accuracy:.1f} % on {len(labels)} held-out digits.",
        "",
        "| weights | scales | OCS ratio | top-1 % | logit SQNR dB | weight SQNR dB | weight overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for granularity in ("channel", "tensor"):
        for bits in BITS:
            for ratio in RATIOS:
                model, report = ocs_onnx.compile(
                    str(digits.MODEL),
                    wbits=bits,
                    ratio=ratio,
                    granularity=granularity,
                    calib_data=digits.CALIBRATION,
                    aclip="none",  # activations unclipped, so that the table shows the weights' effect alone
                    min_split_gain_db=0.0,  # every split that lowers the error, as the paper measures OCS
                    rounding="nearest",  # and nearest rounding, as the paper rounds
                )
                out = logits(model, images)
                accuracy = 100 * np.mean(out.argmax(1) == labels)
                totals = report["totals"]
                weight_bits = report["layers"][0]["bits"]
                label = f"W{bits}" + (f" (grid of W{weight_bits})" if weight_bits != bits else "")
                lines.append(
                    f"| {label} A8 | {granularity} | {ratio} | {accuracy:.1f} | {sqnr_db(reference, out):.1f} | "
                    f"{totals['weight_sqnr_db']['with_ocs']:.1f} | {100 * totals['weight_overhead']:.1f} % |"
                )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

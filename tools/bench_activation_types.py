"""uint8 (asymmetric) or int8 (symmetric) activations: which does onnxruntime run faster, and
which keeps more of the float model? Writes a markdown table of latency ratios to float.

    python tools/bench_activation_types.py [--repeats 30]

Each model is compiled at W6A8 with OCS ratio 0.02 both ways (and with uint8 and no OCS, to
show what OCS's extra channels cost); float and quantized sessions
(CPU provider, default optimizations, one intra-op thread so the numbers are steady) run the
same input in the same process, interleaved, and the median latencies are compared. The
figures are ratios (quantized / float): machines differ, ratios travel better.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, after the installed ocs_onnx: for models/

import ocs_onnx  # noqa: E402
from models import builders, digits  # noqa: E402
from ocs_onnx.quant import sqnr_db  # noqa: E402


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_latencies(sessions: dict[str, ort.InferenceSession], feed: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, feed)  # warm-up
    for _ in range(repeats):
        for name, s in sessions.items():  # interleaved: drifts of a noisy machine hit all alike
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cases():
    with np.load(digits.EVALUATION) as data:
        images = data["image"][:256]
    yield (
        "digits_cnn (demo), batch 256",
        onnx.load(str(digits.MODEL)),
        {"image": images},
        {"calib_data": digits.CALIBRATION},
    )
    conv = builders.conv_bn_residual_net(channels=64)
    yield "conv_bn_residual, 64 ch, batch 32", conv, builders.random_inputs(conv, batch=32), {}
    tf = builders.transformer_block(d_model=256, n_heads=4, d_ff=1024)
    yield "transformer_block d=256, batch 4 x seq 128", tf, builders.random_inputs(tf, batch=4, seq=128), {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    lines = [
        f"onnxruntime {ort.__version__}, CPU provider, 1 thread, median of {args.repeats} interleaved runs.",
        "",
        "| model | activations | integer kernels | latency vs float | output SQNR vs float dB |",
        "|---|---|---|---|---|",
    ]
    for title, model, feed, options in cases():
        variants = {"uint8": ("uint8", 0.02), "int8": ("int8", 0.02), "uint8, no OCS": ("uint8", 0.0)}
        compiled = {
            # activations unclipped: the table compares activation types, not clip methods
            v: ocs_onnx.compile(model, wbits=6, ratio=r, activation_type=t, aclip="none", **options)
            for v, (t, r) in variants.items()
        }
        sessions = {"float": session(model)} | {t: session(m) for t, (m, _) in compiled.items()}
        latency = median_latencies(sessions, feed, args.repeats)
        reference = sessions["float"].run(None, feed)[0]
        for t, (_, report) in compiled.items():
            info = report["onnxruntime"]
            out = sessions[t].run(None, feed)[0]
            lines.append(
                f"| {title} | {t} | {info['integer_kernels']}/{info['quantized_layers']} | "
                f"{latency[t] / latency['float']:.2f} | {sqnr_db(reference, out):.1f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

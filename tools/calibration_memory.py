"""Peak memory of a compile as the calibration set grows: calibration must stream its data
(memory must not grow with the number of samples).

    python tools/calibration_memory.py [--samples 64 1024] [--rounding hessian]

Builds a small conv net with 3x128x128 inputs (196 KB per sample, so 1024 samples are 200 MB
of calibration data), writes the calibration sets, and runs ``python -m ocs_onnx compile`` once
per sample count in a child process, reading the child's peak RSS from ``os.wait4``. Reports
each peak and its ratio to the smallest run (same script, same machine). ``--rounding hessian``
adds every layer's input Gram matrix to what calibration streams.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_net(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)
    w2 = (rng.standard_normal((32, 16, 3, 3)) / np.sqrt(144)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="pool"),
    ]
    graph = helper.make_graph(
        nodes,
        "calibration_memory",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 128, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 1, 1])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Runs cmd; returns (its peak resident memory in MB, wall seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compile failed: {process.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, elapsed  # ru_maxrss is in KB on Linux


def write_calibration_set(path: Path, count: int) -> None:
    """Runs in its own process: a parent holding large arrays would inflate the peak RSS that
    its forked children report (pages shared before exec count for the child)."""
    rng = np.random.default_rng(count)
    np.savez(path, x=rng.standard_normal((count, 3, 128, 128)).astype(np.float32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--rounding", default="nearest", choices=["nearest", "hessian"])
    parser.add_argument("--write", nargs=2, metavar=("PATH", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_calibration_set(Path(args.write[0]), int(args.write[1]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx.save(conv_net(), str(folder / "model.onnx"))
        for count in args.samples:
            data = folder / f"calib{count}.npz"
            subprocess.run([sys.executable, __file__, "--write", str(data), str(count)], check=True)
            cmd = [
                sys.executable,
                "-m",
                "ocs_onnx",
                "compile",
                str(folder / "model.onnx"),
                "-o",
                str(folder / "q.onnx"),
            ]
            cmd += ["--calib-data", str(data), "--calib-samples", str(count), "--calib-batch", "16", "-q"]
            cmd += ["--rounding", args.rounding]
            rss, seconds = peak_rss_mb(cmd)
            rows.append((count, data.stat().st_size / 2**20, rss, seconds))
    base = rows[0][2]
    lines = ["| calibration samples | data size MB | peak RSS MB | RSS vs first | compile s |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {size:.0f} | {rss:.0f} | {rss / base:.3f} | {s:.1f} |" for n, size, rss, s in rows]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile time and peak memory as models grow: transformer-style models of about 0.25, 0.5, 1
and 2 GiB of float32 weights, saved with ONNX external data, each compiled twice in a child
process (weight-only, and with a few synthetic calibration samples).

    python tools/scale.py [--sizes 0.25 0.5 1 2] [--d-model 1024] [--calib-samples 4] [--out scale.md]

The models are stacks of pre-LayerNorm transformer blocks (q/k/v/output projections and a
4x MLP with an Erf GELU, MatMul + bias Add as torch exports them), written straight to their
data file one weight at a time, so that the generator itself needs little memory. The child's
wall time and peak resident memory (``ru_maxrss`` from ``os.wait4``) are measured; the goal is
a peak below twice the model's weight bytes and a time about linear in the size.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

GIB = 2**30
OPSET = 17


class _ExternalWriter:
    """Appends initializers to one data file and returns TensorProtos that point into it."""

    def __init__(self, data_path: Path):
        self.location = data_path.name
        self.file = open(data_path, "wb")
        self.tensors: list[onnx.TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        offset = self.file.tell()
        self.file.write(memoryview(array.reshape(-1)).cast("B"))
        # The bytes never go through the TensorProto: protobuf keeps a cleared field's memory
        # until the message is freed, and this process would hold every weight.
        dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = onnx.TensorProto(name=name, data_type=dtype, dims=array.shape)
        tensor.raw_data = b""  # set_external_data wants raw data to move out
        set_external_data(tensor, self.location, offset, array.nbytes)
        tensor.ClearField("raw_data")
        self.tensors.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


def block_weight_bytes(d_model: int, d_ff: int) -> int:
    """float32 bytes of one block: four d x d projections, the MLP, biases and LayerNorms."""
    return 4 * (4 * d_model * d_model + 2 * d_model * d_ff + 4 * d_model + d_ff + d_model + 4 * d_model)


def blocks_for(weight_bytes: float, d_model: int, d_ff: int) -> int:
    return max(1, math.ceil(weight_bytes / block_weight_bytes(d_model, d_ff)))


def transformer_stack(
    folder: Path, blocks: int, d_model: int = 1024, n_heads: int = 16, d_ff: int | None = None, seed: int = 0
) -> Path:
    """Writes ``folder/model.onnx`` and its data file ``model.onnx.data``; x ["batch", "seq",
    d_model] -> y of the same shape. Weights ~ N(0, 1/fan_in) with a few 5-10 sigma outliers in
    two input channels of each projection (something for OCS to split)."""
    d_ff = d_ff or 4 * d_model
    if d_model % n_heads:
        raise ValueError("d_model must be divisible by n_heads")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    store = _ExternalWriter(folder / "model.onnx.data")
    nodes: list[onnx.NodeProto] = []
    small: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        small.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def weight(d_in: int, d_out: int) -> np.ndarray:
        w = rng.standard_normal((d_in, d_out), dtype=np.float32) * np.float32(1 / math.sqrt(d_in))
        for channel in rng.choice(d_in, size=2, replace=False):
            picks = rng.choice(d_out, size=3, replace=False)
            w[channel, picks] = np.sign(w[channel, picks]) * rng.uniform(5, 10, 3).astype(np.float32) / math.sqrt(d_in)
        return w

    def linear(x: str, name: str, d_in: int, d_out: int) -> str:
        w = store.add(f"{name}.weight", weight(d_in, d_out))
        b = store.add(f"{name}.bias", (rng.standard_normal(d_out, dtype=np.float32) * 0.02))
        return node("Add", [node("MatMul", [x, w], f"{name}/matmul"), b], f"{name}/add_bias")

    def layer_norm(x: str, name: str) -> str:
        scale = store.add(f"{name}.weight", 1 + 0.1 * rng.standard_normal(d_model, dtype=np.float32))
        bias = store.add(f"{name}.bias", 0.02 * rng.standard_normal(d_model, dtype=np.float32))
        return node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-5)

    d_head = d_model // n_heads
    split_heads = const("split_heads", np.array([0, 0, n_heads, d_head], np.int64))
    merge_heads = const("merge_heads", np.array([0, 0, d_model], np.int64))
    inv_sqrt_d = const("inv_sqrt_d_head", np.array(1 / math.sqrt(d_head), np.float32))
    inv_sqrt2 = const("inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
    one, half = const("one", np.array(1, np.float32)), const("half", np.array(0.5, np.float32))
    x = "x"
    for i in range(blocks):
        p = f"blocks.{i}"
        h = layer_norm(x, f"{p}.ln1")
        heads = {}
        for proj, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            t = node("Reshape", [linear(h, f"{p}.attn.{proj}", d_model, d_model), split_heads], f"{p}/{proj}_heads")
            heads[proj] = node("Transpose", [t], f"{p}/{proj}_transpose", perm=perm)
        scores = node("Mul", [node("MatMul", [heads["q"], heads["k"]], f"{p}/qk"), inv_sqrt_d], f"{p}/scale")
        probs = node("Softmax", [scores], f"{p}/softmax", axis=-1)
        context = node(
            "Transpose", [node("MatMul", [probs, heads["v"]], f"{p}/av")], f"{p}/ctx_transpose", perm=[0, 2, 1, 3]
        )
        context = node("Reshape", [context, merge_heads], f"{p}/ctx_merge")
        x = node("Add", [x, linear(context, f"{p}.attn.out", d_model, d_model)], f"{p}/attn_residual")
        f = linear(layer_norm(x, f"{p}.ln2"), f"{p}.mlp.fc1", d_model, d_ff)
        gelu = node("Erf", [node("Mul", [f, inv_sqrt2], f"{p}/gelu_scale")], f"{p}/gelu_erf")
        gelu = node(
            "Mul", [node("Mul", [f, node("Add", [gelu, one], f"{p}/gelu_add")], f"{p}/gelu_mul"), half], f"{p}/gelu"
        )
        x = node("Add", [x, linear(gelu, f"{p}.mlp.fc2", d_ff, d_model)], f"{p}/mlp_residual")
    nodes[-1].output[0] = "y"
    store.close()
    graph = helper.make_graph(
        nodes,
        "transformer_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_model])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_model])],
        small + store.tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))  # by path: the checker looks for the data file beside it
    return path


@dataclass
class Run:
    model: str
    weight_bytes: int
    mode: str
    seconds: float
    peak_rss: int  # bytes
    output_bytes: int


def compile_in_child(model: Path, output: Path, args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stderr) of ``ocs-onnx compile`` in a child process."""
    cmd = [sys.executable, "-m", "ocs_onnx", "compile", str(model), "-o", str(output), "-q", *args]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compile failed ({' '.join(cmd)}): {stderr.strip()}")
    return seconds, usage.ru_maxrss * 1024, stderr  # ru_maxrss is in KiB on Linux


def output_bytes(output: Path) -> int:
    data = output.with_name(output.name + ".data")
    return output.stat().st_size + (data.stat().st_size if data.exists() else 0)


MODES = {
    "weight-only": ["--abits", "none"],
    "calibrated": [],  # --calib-samples is added from the command line
}


def table(runs: list[Run]) -> str:
    lines = [
        "| model | weight bytes | mode | time s | s per GiB | peak RSS MiB | RSS / weight bytes | output MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.model} | {r.weight_bytes:,} | {r.mode} | {r.seconds:.1f} | {r.seconds / (r.weight_bytes / GIB):.1f} "
            f"| {r.peak_rss / 2**20:,.0f} | {r.peak_rss / r.weight_bytes:.2f} | {r.output_bytes / 2**20:,.0f} |"
        )
    return "\n".join(lines)


def parent_peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="weights in GiB")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--extra", default="", help="more compile options, e.g. '--external-data'")
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # (in a child: write one model)
    parser.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate is not None:
        transformer_stack(args.generate, args.blocks, args.d_model)
        return 0
    d_ff = 4 * args.d_model
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for size in args.sizes:
            blocks = blocks_for(size * GIB, args.d_model, d_ff)
            folder = Path(tmp) / f"{size:g}gib"
            start = time.perf_counter()
            # Generated in a child process: a child's ru_maxrss starts at its parent's peak (the
            # parent's memory is the child's until it execs), so this process must stay small.
            generate = [sys.executable, __file__, "--generate", str(folder), "--blocks", str(blocks)]
            subprocess.run(generate + ["--d-model", str(args.d_model)], check=True)
            model = folder / "model.onnx"
            weight_bytes = (folder / "model.onnx.data").stat().st_size
            name = f"{blocks} blocks d={args.d_model}"
            print(
                f"{name}: {weight_bytes / GIB:.2f} GiB written in {time.perf_counter() - start:.1f} s", file=sys.stderr
            )
            for mode in args.modes:
                extra = MODES[mode] + (["--calib-samples", str(args.calib_samples)] if mode == "calibrated" else [])
                output = folder / f"model.{mode}.onnx"
                seconds, peak, _ = compile_in_child(model, output, extra + args.extra.split())
                if peak <= 1.05 * parent_peak_rss():
                    print(
                        f"warning: the child's peak is this process's ({peak / 2**20:.0f} MiB), not its own",
                        file=sys.stderr,
                    )
                runs.append(Run(name, weight_bytes, mode, seconds, peak, output_bytes(output)))
                print(table(runs[-1:]).splitlines()[-1], file=sys.stderr)
                for path in folder.glob(f"model.{mode}.onnx*"):
                    path.unlink()
            for path in folder.iterdir():
                path.unlink()
    text = table(runs)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

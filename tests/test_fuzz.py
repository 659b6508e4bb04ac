"""A seeded fuzzer over the command line: hostile models and calibration files.

Every case starts from one of the small test models, mutates it (flipped bytes, truncation,
removed or reshaped initializers, renamed inputs, broken attributes, wrong element types, ...),
sometimes adds a random calibration file, and runs ``ocs-onnx compile`` in-process. A case
passes when it ends in a documented error (exit 2..6, exactly one ``ocs-onnx: error:`` line on
stderr, no output, no temporary file) or in success (exit 0, nothing on stderr with ``-q``, an
output that onnxruntime loads). Anything else, exit 1 (internal error) included, is a crash.

The statistics of the last run go to the pytest cache (when the cache provider is on);
``python tools/fuzz_stats.py`` prints them as a table.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import signal
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models import builders
from ocs_onnx import errors
from ocs_onnx.cli import main

SEED = 20240601
CASES = 700
# Stops early (with fewer cases) if a slow machine would exceed this.
TIME_BUDGET_SECONDS = 60.0
STATS_CACHE_KEY = "ocs-onnx/fuzz-stats"


def base_models() -> dict[str, onnx.ModelProto]:
    """The test models at their smallest: every case compiles in a few milliseconds."""
    return {
        "mlp_gemm": builders.mlp_gemm(sizes=(4, 8, 3)),
        "conv_bn_residual": builders.conv_bn_residual_net(channels=2),
        "transformer_block": builders.transformer_block(d_model=8, n_heads=2, d_ff=16),
        "constant_weights": builders.constant_weights_net(channels=2, out_features=3),
        "token_embedding": builders.token_embedding_net(vocab=10, d=4),
    }


# --------------------------------------------------------------------------------------------
# Model mutations: each takes (rng, model copy) and returns bytes to write as the model file
# --------------------------------------------------------------------------------------------

ELEM_TYPES = [
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.BOOL,
    TensorProto.STRING,
    TensorProto.UNDEFINED,
    12345,
]


def _serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def flip_bytes(rng, model):
    data = bytearray(_serialize(model))
    for _ in range(int(rng.integers(1, 6))):
        i = int(rng.integers(len(data)))
        data[i] ^= int(rng.integers(1, 256))
    return bytes(data)


def truncate(rng, model):
    data = _serialize(model)
    return data[: int(rng.integers(1, len(data)))]


def remove_initializer(rng, model):
    if not model.graph.initializer:
        return remove_node(rng, model)
    del model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    return _serialize(model)


def reshape_initializer(rng, model):
    """Wrong dims: either the same values under other dims, or dims that disagree with the data."""
    if not model.graph.initializer:
        return remove_node(rng, model)
    tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    values = numpy_helper.to_array(tensor)
    if rng.random() < 0.5 and values.size > 1:
        n = values.size
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        first = int(rng.choice(divisors))
        shape = [first, n // first] if rng.random() < 0.5 else [n // first, 1, first]
        tensor.CopyFrom(numpy_helper.from_array(values.reshape(shape), tensor.name))
    else:
        dims = list(tensor.dims) or [1]
        axis = int(rng.integers(len(dims)))
        dims[axis] = int(rng.choice([0, 1, dims[axis] + 1, dims[axis] * 2, 7]))
        del tensor.dims[:]
        tensor.dims.extend(dims)
    return _serialize(model)


def rename_input(rng, model):
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    target = inputs[int(rng.integers(len(inputs)))]
    choice = rng.random()
    if choice < 0.6:
        target.name = f"renamed_{int(rng.integers(100))}"  # its consumers now read a tensor nobody produces
    elif choice < 0.8 and model.graph.node:
        target.name = model.graph.node[-1].output[0]  # collides with a node output
    else:
        target.name = ""
    return _serialize(model)


def _random_node(rng, model):
    return model.graph.node[int(rng.integers(len(model.graph.node)))]


def break_attribute(rng, model):
    nodes = [n for n in model.graph.node if n.attribute]
    if not nodes:
        return remove_node(rng, model)
    node = nodes[int(rng.integers(len(nodes)))]
    index = int(rng.integers(len(node.attribute)))
    attribute = node.attribute[index]
    choice = rng.random()
    if choice < 0.3:
        del node.attribute[index]
    elif choice < 0.6:  # mistyped: same name, another type
        replacement = rng.choice(["string", "float", "ints", "tensor"])
        new = {
            "string": lambda: helper.make_attribute(attribute.name, "oops"),
            "float": lambda: helper.make_attribute(attribute.name, 2.5),
            "ints": lambda: helper.make_attribute(attribute.name, [3, -1, 0]),
            "tensor": lambda: helper.make_attribute(attribute.name, numpy_helper.from_array(np.ones(2, np.float32))),
        }[replacement]()
        node.attribute[index].CopyFrom(new)
    elif choice < 0.85:  # out-of-range values
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = int(rng.choice([-1, 0, 2, 7, 1 << 40, -(1 << 40)]))
        elif attribute.type == onnx.AttributeProto.INTS:
            del attribute.ints[:]
            attribute.ints.extend(int(v) for v in rng.integers(-3, 9, size=int(rng.integers(0, 6))))
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = float(rng.choice([np.nan, np.inf, -1.0, 0.0, 1e30]))
        else:
            del node.attribute[index]
    else:  # an attribute the op does not have
        node.attribute.append(helper.make_attribute("bogus", 1))
    return _serialize(model)


def wrong_element_type(rng, model):
    choice = rng.random()
    elem = int(rng.choice(ELEM_TYPES))
    if choice < 0.5 and model.graph.initializer:
        model.graph.initializer[int(rng.integers(len(model.graph.initializer)))].data_type = elem
    elif choice < 0.8:
        model.graph.input[int(rng.integers(len(model.graph.input)))].type.tensor_type.elem_type = elem
    else:
        model.graph.output[int(rng.integers(len(model.graph.output)))].type.tensor_type.elem_type = elem
    return _serialize(model)


def remove_node(rng, model):
    if len(model.graph.node) > 1:
        del model.graph.node[int(rng.integers(len(model.graph.node)))]
    return _serialize(model)


def rewire_node(rng, model):
    """A node reads another tensor (a later node's output: a cycle or an unsorted graph) or a
    producer's output gets a taken name (two producers)."""
    node = _random_node(rng, model)
    tensors = [o for n in model.graph.node for o in n.output] + [i.name for i in model.graph.input]
    tensors += [t.name for t in model.graph.initializer] + ["", "nowhere"]
    if node.input and rng.random() < 0.6:
        node.input[int(rng.integers(len(node.input)))] = str(rng.choice(tensors))
    elif node.output:
        node.output[0] = str(rng.choice(tensors))
    return _serialize(model)


def change_op(rng, model):
    node = _random_node(rng, model)
    choice = rng.random()
    if choice < 0.4:
        node.op_type = str(rng.choice(["Conv", "Gemm", "MatMul", "Relu", "Add", "Identity", "NoSuchOp"]))
    elif choice < 0.7:
        node.domain = str(rng.choice(["com.acme", "com.microsoft", "ai.onnx.ml"]))
        if not any(o.domain == node.domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(node.domain, 1))
    else:
        model.opset_import[0].version = int(rng.choice([1, 6, 9, 12, 21, 28, 29, 99]))
    return _serialize(model)


def change_input_shape(rng, model):
    value = model.graph.input[int(rng.integers(len(model.graph.input)))]
    dims = value.type.tensor_type.shape.dim
    if rng.random() < 0.3:
        value.type.tensor_type.ClearField("shape") if rng.random() < 0.5 else dims.add().CopyFrom(dims[-1])
    elif len(dims):
        dim = dims[int(rng.integers(len(dims)))]
        choice = rng.random()
        if choice < 0.4:
            dim.dim_value = int(rng.choice([0, 1, 2, 3, 5]))
        elif choice < 0.7:
            dim.dim_param = "dynamic"
        else:
            dim.Clear()
    return _serialize(model)


def poison_weight(rng, model):
    """NaN, Inf, huge, tiny or all-zero values in a float initializer (or a Constant node)."""
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    if not floats:
        return change_op(rng, model)
    tensor = floats[int(rng.integers(len(floats)))]
    values = numpy_helper.to_array(tensor).copy()
    value = float(rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45, 0.0]))
    if values.size:
        if rng.random() < 0.3:
            values[...] = value
        else:
            values.flat[int(rng.integers(values.size))] = value
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return _serialize(model)


def tiny_weights_large_bias(rng, model):
    """A pruned channel: one output channel's weights scaled to ~0 and its bias made large (a
    folded BatchNorm with gamma ~ 0 and beta != 0), so that an int32 bias cannot hold it."""
    initializers = {t.name: t for t in model.graph.initializer}
    layers = [
        n for n in model.graph.node
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[1] in initializers and n.input[2] in initializers
    ]
    if not layers:
        return poison_weight(rng, model)
    node = layers[int(rng.integers(len(layers)))]
    weight, bias = initializers[node.input[1]], initializers[node.input[2]]
    w, b = numpy_helper.to_array(weight).copy(), numpy_helper.to_array(bias).copy()
    out_axis = 0 if node.op_type == "Conv" or any(a.name == "transB" and a.i for a in node.attribute) else 1
    if w.dtype != np.float32 or b.dtype != np.float32 or b.size != w.shape[out_axis]:
        return poison_weight(rng, model)
    channel = int(rng.integers(b.size))
    index = [slice(None)] * w.ndim
    index[out_axis] = channel
    w[tuple(index)] *= float(rng.choice([1e-7, 1e-4, 0.0]))
    b[channel] = float(rng.choice([1.0, -5.0, 1e4, 1e9]))
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    bias.CopyFrom(numpy_helper.from_array(b, bias.name))
    return _serialize(model)


def add_random_op(rng, model):
    """Noise from a RandomNormalLike / RandomUniformLike added to a float input: an op that must
    never be folded into a constant."""
    floats = [v for v in model.graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    if not floats:
        return duplicate_output(rng, model)
    x = floats[0].name
    op = str(rng.choice(["RandomNormalLike", "RandomUniformLike"]))
    noise, noisy = f"{x}_fuzz_noise", f"{x}_fuzz_noisy"
    for node in model.graph.node:
        node.input[:] = [noisy if name == x else name for name in node.input]
    model.graph.node.insert(0, helper.make_node("Add", [x, noise], [noisy], name="fuzz_add"))
    model.graph.node.insert(0, helper.make_node(op, [x], [noise], name="fuzz_noise"))
    return _serialize(model)


def duplicate_output(rng, model):
    """A graph output listed twice (valid ONNX): its name and type must survive."""
    output = model.graph.output[int(rng.integers(len(model.graph.output)))]
    model.graph.output.insert(int(rng.integers(len(model.graph.output) + 1)), output)
    return _serialize(model)


def input_as_output(rng, model):
    """A graph input that is also a graph output (valid ONNX): both roles must survive."""
    value = model.graph.input[int(rng.integers(len(model.graph.input)))]
    model.graph.output.insert(int(rng.integers(len(model.graph.output) + 1)), value)
    return _serialize(model)


def sparse_weight(rng, model):
    """An initializer stored as a sparse tensor (valid ONNX): it is the dense weight it stands for."""
    candidates = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1]
    if not candidates:
        return _serialize(model)
    tensor = candidates[int(rng.integers(len(candidates)))]
    dense = numpy_helper.to_array(tensor)
    dense = np.where(rng.random(dense.shape) < 0.5, 0, dense).astype(np.float32)
    indices = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[indices], tensor.name),
        numpy_helper.from_array(indices.astype(np.int64), f"{tensor.name}_indices"),
        list(dense.shape),
    )
    model.graph.initializer.remove(tensor)
    model.graph.sparse_initializer.append(sparse)
    return _serialize(model)


def unchanged(rng, model):
    return _serialize(model)


MUTATIONS = {
    "flip bytes": flip_bytes,
    "truncate": truncate,
    "remove initializer": remove_initializer,
    "reshape initializer": reshape_initializer,
    "rename input": rename_input,
    "break attribute": break_attribute,
    "wrong element type": wrong_element_type,
    "remove node": remove_node,
    "rewire node": rewire_node,
    "change op or opset": change_op,
    "change input shape": change_input_shape,
    "poison weight": poison_weight,
    "tiny weights, large bias": tiny_weights_large_bias,
    "random op": add_random_op,
    "duplicate output": duplicate_output,
    "input as output": input_as_output,
    "sparse weight": sparse_weight,
    "none": unchanged,
}

# --------------------------------------------------------------------------------------------
# Calibration files
# --------------------------------------------------------------------------------------------

CALIB_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.complex64]


def _model_inputs(model: onnx.ModelProto) -> list[tuple[str, list]]:
    inits = {t.name for t in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        result.append((value.name, dims))
    return result


def calibration_file(rng, model: onnx.ModelProto, folder: Path) -> tuple[Path, str]:
    """A calibration file for ``model``: often right, often subtly or plainly wrong."""
    inputs = _model_inputs(model) or [("x", [None, 4])]
    kind = str(
        rng.choice(
            ["matching", "wrong dtype", "wrong rank", "wrong name", "nan", "pickle", "zero samples", "random", "damaged zip"]
        )
    )
    samples = int(rng.integers(1, 12))
    arrays = {}
    for name, dims in inputs:
        shape = [samples] + [d if d else int(rng.integers(1, 5)) for d in dims[1:]]
        dtype = np.int64 if name == "ids" else np.float32
        array = rng.integers(0, 10, size=shape) if dtype == np.int64 else rng.standard_normal(shape)
        arrays[name] = array.astype(dtype)
    name = next(iter(arrays))
    if kind == "wrong dtype":
        arrays[name] = arrays[name].astype(CALIB_DTYPES[int(rng.integers(len(CALIB_DTYPES)))])
    elif kind == "wrong rank":
        arrays[name] = arrays[name].reshape(arrays[name].shape + (1,))
    elif kind == "wrong name":
        arrays[f"{name}_other"] = arrays.pop(name)
    elif kind == "nan" and arrays[name].dtype.kind == "f":
        arrays[name].flat[int(rng.integers(arrays[name].size))] = float(rng.choice([np.nan, np.inf]))
    elif kind == "zero samples":
        arrays = {k: v[:0] for k, v in arrays.items()}
    elif kind == "random":
        arrays = {
            str(rng.choice([name, "x", "a b", "../up"])): rng.standard_normal(
                tuple(int(d) for d in rng.integers(0, 4, size=int(rng.integers(0, 5))))
            ).astype(CALIB_DTYPES[int(rng.integers(len(CALIB_DTYPES)))])
            for _ in range(int(rng.integers(1, 3)))
        }
    path = folder / "calib.npz"
    if kind == "pickle":
        # An object array: np.savez pickles it; the reader must refuse it without unpickling.
        arrays[name] = np.array([{"payload": 1}] * samples, dtype=object)
        with zipfile.ZipFile(path, "w") as archive:
            for key, value in arrays.items():
                with archive.open(f"{key}.npy", "w") as f:
                    np.lib.format.write_array(f, value, allow_pickle=True)
    elif kind == "random" and rng.random() < 0.3:
        path.write_bytes(pickle.dumps(arrays))  # a pickle file named .npz
    elif kind == "damaged zip":
        # zip-level damage: flipped bytes in the compressed data, the CRCs or the directory
        np.savez_compressed(path, **arrays)
        data = bytearray(path.read_bytes())
        for offset in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[int(offset)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
    else:
        np.savez(path, **arrays)
    return path, kind


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_stderr():
    """Everything written to stderr, by Python or by native code (onnxruntime), as one string."""
    result = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        text = io.StringIO()
        try:
            with contextlib.redirect_stderr(text):
                yield result
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        result.append(sink.read().decode(errors="replace") + text.getvalue())


def onnxruntime_loads(path: Path) -> tuple[bool, str]:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime has one exception type per status code
        return False, str(exc)
    return True, ""


def onnx_valid(path: Path, full_check: bool) -> tuple[bool, str]:
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=full_check)
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)
    return True, ""


@dataclass
class Outcome:
    case: str
    code: int | None
    stderr: str
    problem: str | None = None


NON_DETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# The verify pass's own default threshold: the integer kernels must compute the QDQ model.
MIN_KERNEL_AGREEMENT_DB = 15.0


def output_problem(model: onnx.ModelProto, output: Path) -> str | None:
    """What is wrong with a compiled model that onnxruntime loads, checked without trusting the
    compiler's own verification (it may be off): output names and types as the input's; every
    random op kept; and onnxruntime's integer kernels computing what the QDQ model specifies."""
    compiled = onnx.load(str(output))
    def outputs(m: onnx.ModelProto) -> list:
        return [(o.name, o.type.tensor_type.elem_type) for o in m.graph.output]

    if outputs(compiled) != outputs(model):
        return f"output names or types changed: {outputs(model)} -> {outputs(compiled)}"
    random_ops = lambda m: sorted(n.op_type for n in m.graph.node if n.op_type in NON_DETERMINISTIC_OPS)  # noqa: E731
    if random_ops(compiled) != random_ops(model):
        return "a random op was folded away"
    if random_ops(model):
        return None  # two runs differ anyway: no agreement to check
    try:
        feed = builders.random_inputs(compiled, batch=2, seq=3, seed=0, int_high=4)
        fused = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, feed)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        exact = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"]).run(None, feed)
        reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    except Exception:  # noqa: BLE001 - inputs a fuzzed model cannot run on say nothing here
        return None
    if not all(np.isfinite(np.asarray(r, dtype=np.float64)).all() for r in reference if np.asarray(r).dtype.kind == "f"):
        return None  # the input model computes NaN or Inf (a poisoned weight): no answer to agree on
    for a, b in zip(exact, fused):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.dtype.kind != "f" or not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        noise = float(np.sum((a - b) ** 2))
        if noise > 0 and 10 * np.log10(max(float(np.sum(a**2)), 1e-300) / noise) < MIN_KERNEL_AGREEMENT_DB:
            return "onnxruntime's integer kernels disagree with the QDQ model"
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"not a file: {path.stat().st_mode:o}"


@contextlib.contextmanager
def _signal_after(interrupt: tuple[int, float] | None):
    """Delivers the signal to the compiler's handler after the delay, as the kernel would: the
    handler for that signal runs wherever the main thread is (only while the compiler's own
    handler is installed: after main returns, the default action would end the test run)."""
    if interrupt is None:
        yield
        return
    signum, delay = interrupt

    def deliver(_alarm, frame):
        handler = signal.getsignal(signum)
        if callable(handler) and getattr(handler, "__module__", "") == "ocs_onnx.cli":
            handler(signum, frame)

    previous = signal.signal(signal.SIGALRM, deliver)
    signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-4))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(index: int, rng: np.random.Generator, models: dict[str, onnx.ModelProto], folder: Path) -> Outcome:
    model_name = str(rng.choice(sorted(models)))
    mutation = str(rng.choice(sorted(MUTATIONS)))
    model = onnx.ModelProto()
    model.CopyFrom(models[model_name])
    data = MUTATIONS[mutation](rng, model)
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(data)
    output = folder / "model.q.onnx"
    args = ["compile", str(path), "-o", str(output), "-q", "--calib-samples", "8", "--calib-batch", "4"]
    args += ["--wbits", str(int(rng.integers(2, 9)))]
    calib = "synthetic"
    choice = rng.random()
    if choice < 0.2:
        args += ["--abits", "none"]
        calib = "none"
    elif choice < 0.55:
        calib_path, calib = calibration_file(rng, models[model_name], folder)
        args += ["--calib-data", str(calib_path)]
    if rng.random() < 0.2:
        args += ["--no-verify"]
    report = folder / "report.json"
    if rng.random() < 0.1:
        # a report path that collides with an input or another output: refused (exit 2)
        targets = ["model.onnx", "model.q.onnx", "model.q.onnx.data", "model.q.after-name-nodes.onnx"]
        report = folder / str(rng.choice(targets + (["calib.npz"] if "--calib-data" in args else [])))
        args += ["--dump-after", "name-nodes", "--external-data", "--report", str(report)]
    elif rng.random() < 0.3:
        args += ["--report", str(report)]
    if rng.random() < 0.15:
        args += ["--dump-after", str(rng.choice(["name-nodes", "weight-ocs"]))]
    if rng.random() < 0.03:
        # an output that is a FIFO: refused (exit 2), never replaced by a regular file
        os.mkfifo(folder / "fifo.onnx")
        args[args.index("-o") + 1] = str(folder / "fifo.onnx")
    # a signal at a random point of the compile (or after it: then it changes nothing)
    interrupt = (int(rng.choice([signal.SIGINT, signal.SIGTERM])), float(rng.uniform(0.0, 0.06)))
    interrupt = interrupt if rng.random() < 0.1 else None
    case = f"#{index} {model_name}: {mutation}, calibration {calib}: {' '.join(args[4:])}"
    case += f", signal {interrupt[0]} after {interrupt[1]:.3f} s" if interrupt else ""
    before = set(os.listdir(folder))
    temporary_before = set(os.listdir(tempfile.gettempdir()))
    digest = hashlib.sha256(data).hexdigest()
    inputs_before = {name: _digest(folder / name) for name in before}
    try:
        with captured_stderr() as captured, _signal_after(interrupt):
            code = main(args)
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is a crash
        return Outcome(case, None, "", f"exception escaped main: {type(exc).__name__}: {exc}")
    stderr = captured[0].strip()
    lines = stderr.splitlines()
    problem = None
    changed = [n for n, d in inputs_before.items() if _digest(folder / n) != d]
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        problem = "the input model changed"
    elif changed:
        problem = f"input files changed: {changed}"
    elif code == 0:
        if stderr:
            problem = "output on stderr with -q"
        else:
            # Without --no-verify the compiler checked that onnxruntime runs the output; with it,
            # the user opted out of onnxruntime (e.g. for custom ops): the output must be valid
            # ONNX, and pass the full check (shape and type inference) when the input does.
            if "--no-verify" not in args:
                loads, reason = onnxruntime_loads(output)
            else:
                loads, reason = onnx_valid(output, full_check=onnx_valid(path, full_check=True)[0])
            if "--report" in args:
                try:
                    json.loads(report.read_text())
                except (OSError, ValueError) as exc:
                    problem = f"no valid report: {exc}"
            if problem is None and not loads:
                problem = f"invalid output: {reason}"
            if problem is None and loads:
                problem = output_problem(onnx.load(str(path)), output)
    elif code in (errors.USAGE, errors.INVALID_MODEL, errors.UNSUPPORTED_MODEL, errors.CALIBRATION_DATA, 6):
        if len(lines) != 1 or not lines[0].startswith("ocs-onnx: error: "):
            problem = "not exactly one error line on stderr"
        elif any(p.exists() and p.name not in before for p in (output, report)):
            problem = "an output or a report was written on failure"
    elif interrupt is not None and code == 128 + interrupt[0]:
        said = "interrupted" if interrupt[0] == signal.SIGINT else "terminated"
        if lines != [f"ocs-onnx: {said}; nothing was written"]:
            problem = "not exactly the one interrupt line on stderr"
        elif any(p.exists() and p.name not in before for p in (output, report)):
            problem = "an output or a report was written though the compile was interrupted"
    else:
        problem = f"exit code {code}"
    if problem is None and set(os.listdir(tempfile.gettempdir())) != temporary_before:
        problem = f"left in the temporary folder: {sorted(set(os.listdir(tempfile.gettempdir())) ^ temporary_before)}"
    written = {output.name, report.name, output.name + ".data"} | {p for p in os.listdir(folder) if ".after-" in p}
    leftovers = sorted(set(os.listdir(folder)) - before - (written if code == 0 else {output.name, report.name}))
    if problem is None and leftovers:
        problem = f"files left behind: {leftovers}"
    return Outcome(case, code, stderr, problem)


@dataclass
class FuzzStats:
    seed: int = SEED
    cases: int = 0
    seconds: float = 0.0
    exit_codes: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)
    crashes: list[Outcome] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
            "valid_outputs": self.exit_codes.get(0, 0),
            "clean_errors": {str(k): v for k, v in sorted(self.exit_codes.items()) if k not in (0, None, 1)},
            "crashes": len(self.crashes),
            "crash_cases": [f"{c.case} -> {c.problem}: {c.stderr[:300]}" for c in self.crashes],
        }


@contextlib.contextmanager
def _private_temporary_folder():
    with tempfile.TemporaryDirectory() as private:
        previous, tempfile.tempdir = tempfile.tempdir, private
        try:
            yield
        finally:
            tempfile.tempdir = previous


def fuzz(cases: int = CASES, seed: int = SEED, budget: float = TIME_BUDGET_SECONDS) -> FuzzStats:
    rng = np.random.default_rng(seed)
    models = base_models()
    stats = FuzzStats(seed=seed)
    start = time.perf_counter()
    # a temporary folder of the fuzzer's own as the process's: what a case leaves there is the
    # case's (the system's is shared with every other process on the machine)
    with tempfile.TemporaryDirectory() as tmp, _private_temporary_folder():
        for index in range(cases):
            if time.perf_counter() - start > budget:
                break
            outcome = run_case(index, rng, models, Path(tmp) / f"case{index}")
            stats.cases += 1
            if outcome.problem is not None:
                stats.crashes.append(outcome)
            else:
                stats.exit_codes[outcome.code] += 1
    stats.seconds = time.perf_counter() - start
    return stats


def test_fuzzed_models_and_calibration_files_never_crash_the_compiler(request):
    stats = fuzz()
    summary = stats.as_dict()
    # Stored before the assertions, so that a failing run's statistics can be read too; without
    # the cache provider (-p no:cacheprovider) there is no cache and they are not stored.
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        cache.set(STATS_CACHE_KEY, summary)
    assert stats.crashes == [], "\n".join(summary["crash_cases"])
    # The fuzzer must reach both ends: real outputs and every kind of clean refusal.
    assert stats.cases >= 300
    assert summary["valid_outputs"] >= 0.1 * stats.cases
    assert set(summary["clean_errors"]) >= {"3", "4", "5"}

"""Hostile inputs end to end: every failure is one line and a documented exit code, the input is
never touched, and a failed compile leaves no output, no report and no temporary file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ocs_onnx
from models import builders
from ocs_onnx import errors
from ocs_onnx.cli import main
from ocs_onnx.quant import sqnr_db
from ocs_onnx.writing import write_files_atomic

from .conftest import max_relative_error, run_model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def small_mlp() -> onnx.ModelProto:
    return builders.mlp_gemm(sizes=(4, 8, 3))


def save(model: onnx.ModelProto | bytes, path: Path) -> Path:
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def assert_clean_failure(code, err, expected_code, folder: Path, listing: set[str], *fragments):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocs-onnx: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    # no output, no report, no temporary file: the folder holds exactly what it held before
    assert set(os.listdir(folder)) == listing


# --------------------------------------------------------------------------------------------
# Bad models
# --------------------------------------------------------------------------------------------


def _mutated(mutate) -> onnx.ModelProto:
    model = small_mlp()
    mutate(model)
    return model


def _with_node(model: onnx.ModelProto, index: int, **fields) -> None:
    node = model.graph.node[index]
    for name, value in fields.items():
        setattr(node, name, value)


def _custom_op(model: onnx.ModelProto) -> None:
    _with_node(model, 1, op_type="Frob", domain="com.acme")  # the Relu between the two Gemms
    model.opset_import.append(helper.make_opsetid("com.acme", 1))


def _cycle(model: onnx.ModelProto) -> None:
    model.graph.node[1].input[0] = "loop"
    model.graph.node.append(helper.make_node("Identity", ["fc0/relu_out"], ["loop"], name="back_edge"))


def _two_producers(model: onnx.ModelProto) -> None:
    model.graph.node[1].output[0] = "fc0/gemm_out"
    model.graph.node[2].input[0] = "fc0/gemm_out"


def _duplicate_initializer(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.float32), "fc0.bias"))


def _wrong_dims(model: onnx.ModelProto) -> None:
    weight = model.graph.initializer[0]
    weight.dims[0] -= 1  # 7 x 4 claimed, 8 x 4 stored (onnx.checker only catches too little data)


def _non_utf8_name(model: onnx.ModelProto) -> bytes:
    model.graph.node[1].name = "fc0/relu\u00e9"
    data = model.SerializeToString()
    return data.replace("fc0/relu\u00e9".encode(), b"fc0/relu\xff\xfe")  # same length, not UTF-8


def _double_bias(model: onnx.ModelProto) -> None:
    # a float64 bias on a float32 Gemm: onnx.checker accepts it, onnxruntime's type check does not
    bias = model.graph.initializer[1]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(np.float64), bias.name))


def _zero_sized_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 0  # the Gemm weight needs 4


def _zero_batch(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0


def _gather_out_of_range(model: onnx.ModelProto) -> None:
    """A Gather of input columns with an index beyond them: onnxruntime loads the model and fails
    when it runs it, whatever the inputs."""
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 1, 2, 9], np.int64), "columns"))
    model.graph.node.insert(0, helper.make_node("Gather", ["x", "columns"], ["picked"], name="pick", axis=1))
    model.graph.node[1].input[0] = "picked"


BAD_MODELS = {
    # a valid protobuf that is not a model
    "a serialized TensorProto": (
        lambda: numpy_helper.from_array(np.ones((3, 3), np.float32), "w").SerializeToString(),
        [],
        errors.INVALID_MODEL,
        ["not a readable ONNX model"],
    ),
    "a serialized GraphProto": (
        lambda: small_mlp().graph.SerializeToString(),
        [],
        errors.INVALID_MODEL,
        ["not an ONNX"],
    ),
    "an op onnx.checker does not know": (
        lambda: _mutated(lambda m: _with_node(m, 1, op_type="Frobnicate")),
        [],
        errors.INVALID_MODEL,
        ["onnx.checker", "Frobnicate"],
    ),
    "an opset newer than onnx and onnxruntime know": (
        lambda: _mutated(lambda m: setattr(m.opset_import[0], "version", 30)),
        [],
        errors.UNSUPPORTED_MODEL,
        ["opset 30"],
    ),
    "an unknown custom op, calibrated": (
        lambda: _mutated(_custom_op),
        [],
        errors.UNSUPPORTED_MODEL,
        ["'fc0/relu'", "'Frob'", "'com.acme'", "--abits none"],
    ),
    "an unknown custom op, weight-only and verified": (
        lambda: _mutated(_custom_op),
        ["--abits", "none"],
        errors.UNSUPPORTED_MODEL,
        ["'Frob'", "'com.acme'", "--no-verify"],
    ),
    "a graph cycle": (lambda: _mutated(_cycle), [], errors.INVALID_MODEL, ["onnx.checker"]),
    "a dangling input": (
        lambda: _mutated(lambda m: m.graph.node[1].input.__setitem__(0, "nobody_makes_this")),
        [],
        errors.INVALID_MODEL,
        ["nobody_makes_this"],
    ),
    "two nodes producing one tensor": (lambda: _mutated(_two_producers), [], errors.INVALID_MODEL, ["fc0/gemm_out"]),
    "duplicate initializer names": (
        lambda: _mutated(_duplicate_initializer),
        [],
        errors.INVALID_MODEL,
        ["fc0.bias", "not unique"],
    ),
    "weight data that does not fit its dims": (
        lambda: _mutated(_wrong_dims),
        ["--abits", "none", "--no-verify"],  # caught at load time, not by onnxruntime
        errors.INVALID_MODEL,
        ["'fc0.weight'", "[7, 4]"],
    ),
    "a name that is not UTF-8": (lambda: _non_utf8_name(small_mlp()), [], errors.INVALID_MODEL, ["UTF-8"]),
    "an output of an unknown element type": (
        lambda: _mutated(lambda m: setattr(m.graph.output[0].type.tensor_type, "elem_type", 12345)),
        ["--abits", "none", "--no-verify"],
        errors.INVALID_MODEL,
        ["'y'", "12345"],
    ),
    "types onnxruntime rejects": (
        lambda: _mutated(_double_bias),
        [],
        errors.INVALID_MODEL,
        ["onnxruntime", "fc0/gemm"],
    ),
    "a zero-sized input the layers do not fit": (
        lambda: _mutated(_zero_sized_input),
        [],
        errors.INVALID_MODEL,
        ["onnxruntime", "fc0/gemm"],
    ),
    "a model onnxruntime loads but cannot run, calibrated on synthetic inputs": (
        lambda: _mutated(_gather_out_of_range),
        ["-q"],  # without it, the warning that the inputs are synthetic comes first
        errors.INVALID_MODEL,
        ["onnxruntime cannot run the model on synthetic inputs", "'pick'", "--calib-data"],
    ),
    "a model onnxruntime loads but cannot run, weight-only and verified": (
        lambda: _mutated(_gather_out_of_range),
        ["--abits", "none"],
        errors.INVALID_MODEL,
        ["onnxruntime cannot run the model", "the input model fails", "'pick'", "--no-verify"],
    ),
    "a fixed batch dimension of zero": (
        lambda: _mutated(_zero_batch),
        [],
        errors.UNSUPPORTED_MODEL,
        ["'x'", "batch"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_bad_model_is_refused_with_one_line_and_leaves_nothing(case, tmp_path, capsys):
    make, extra, expected_code, fragments = BAD_MODELS[case]
    model = save(make(), tmp_path / "model.onnx")
    before, listing = sha256(model), set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json", *extra)
    assert_clean_failure(code, err, expected_code, tmp_path, listing, *fragments)
    assert sha256(model) == before


def test_a_model_that_cannot_run_compiles_weight_only_without_verification(tmp_path, capsys):
    path = save(_mutated(_gather_out_of_range), tmp_path / "model.onnx")
    code, err = run_cli(capsys, "compile", path, "--abits", "none", "--no-verify", "-q")
    assert code == 0 and err == ""
    output = onnx.load(str(tmp_path / "model.q.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in output.graph.node) == 2


def _seq_reshape_model() -> onnx.ModelProto:
    """x [N, S] -> Reshape to [N, S/4, 4] -> MatMul: runs when S is a multiple of 4 (the synthetic
    inputs' 32), not otherwise."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "groups_of_4"], ["grouped"], name="group"),
            helper.make_node("MatMul", ["grouped", "w"], ["y"], name="matmul"),
        ],
        "seq_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "G", 3])],
        [
            numpy_helper.from_array(np.array([0, -1, 4], np.int64), "groups_of_4"),
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_calibration_data_the_model_cannot_run_on_is_a_calibration_data_error(tmp_path, capsys):
    model = save(_seq_reshape_model(), tmp_path / "model.onnx")
    calib = _npz(tmp_path, x=np.ones((4, 6), np.float32))  # 6 values per sample: not groups of 4
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "--calib-data", calib)
    assert_clean_failure(
        code, err, errors.CALIBRATION_DATA, tmp_path, listing, "calibration batch 0", "runs on synthetic inputs"
    )
    good = _npz(tmp_path, x=np.ones((4, 8), np.float32))
    assert run_cli(capsys, "compile", model, "--calib-data", good, "-q") == (0, "")


def test_calibration_data_for_a_model_that_cannot_run_at_all_is_not_blamed(tmp_path, capsys):
    model = save(_mutated(_gather_out_of_range), tmp_path / "model.onnx")
    calib = _npz(tmp_path, x=_x())
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "--calib-data", calib)
    assert_clean_failure(
        code, err, errors.INVALID_MODEL, tmp_path, listing, "cannot run the model", "nor on synthetic inputs", "'pick'"
    )


def test_an_unknown_custom_op_stays_float_and_the_rest_compiles_without_running_the_model(tmp_path, capsys):
    model = _mutated(_custom_op)
    # a custom op that reuses a quantizable op's name is not a Gemm either
    _with_node(model, 0, domain="com.acme")
    path = save(model, tmp_path / "model.onnx")
    report_path = tmp_path / "r.json"
    code, err = run_cli(
        capsys, "compile", path, "--abits", "none", "--no-verify", "-q", "--report", report_path, "--ratio", 0.2
    )
    assert code == 0 and err == ""
    output = onnx.load(str(tmp_path / "model.q.onnx"))
    custom = [(n.op_type, n.domain) for n in output.graph.node if n.domain == "com.acme"]
    assert sorted(custom) == [("Frob", "com.acme"), ("Gemm", "com.acme")]
    report = json.loads(report_path.read_text())
    assert [layer["name"] for layer in report["layers"]] == ["fc1/gemm"]
    assert any(n.op_type == "DequantizeLinear" for n in output.graph.node)


def _poisoned(value: float) -> onnx.ModelProto:
    model = builders.mlp_gemm()
    weight = next(t for t in model.graph.initializer if t.name == "fc1.weight")
    array = numpy_helper.to_array(weight).copy()
    array[0, 0] = value
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    return model


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_a_non_finite_weight_keeps_its_layer_float_with_a_one_line_warning(value, tmp_path, capsys):
    path = save(_poisoned(value), tmp_path / "model.onnx")
    report_path = tmp_path / "r.json"
    code, err = run_cli(capsys, "compile", path, "--report", report_path)
    assert code == 0, err
    # warnings only, each on one line: no numpy RuntimeWarning or onnxruntime log in between
    lines = [line for line in err.splitlines() if line.startswith("ocs-onnx: ")]
    warnings = [line for line in lines if line.startswith("ocs-onnx: warning: ")]
    assert any("fc1/gemm kept float: weight contains NaN or Inf" in line for line in warnings)
    assert "RuntimeWarning" not in err and "onnxruntime:" not in err
    report = json.loads(report_path.read_text())  # strict JSON: no NaN anywhere
    assert "NaN or Inf" in report["kept_float"]["fc1/gemm"]
    assert [layer["name"] for layer in report["layers"]] == ["fc0/gemm", "fc2/gemm"]


def _one_channel_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    weight[2, 0, 1, 1] = 8.0  # an outlier to split
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "one_channel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("make", [_one_channel_conv, lambda: builders.mlp_gemm(sizes=(1, 8, 3))], ids=["conv", "gemm"])
def test_a_layer_with_one_input_channel_is_split_and_compiles(make):
    model = make()
    first = model.graph.node[0].name
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.5, ocs_guard=False, stop_after="qa-split")
    layer = next(layer for layer in report["layers"] if layer["name"] == first)
    assert layer["weight_shape"][1] == 1 and layer["split_channels"] == [0]  # the only channel, split
    feed = builders.random_inputs(model, batch=3)
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-5
    quantized, report = ocs_onnx.compile(model, wbits=4, calib_samples=8)
    assert report["onnxruntime"]["integer_kernels"] >= 1
    assert np.isfinite(run_model(quantized, feed)[0]).all()


def _zero_hidden_mlp() -> onnx.ModelProto:
    """x [N, 4] -> Gemm to 0 features -> Gemm back to 3: zero-sized weights and activations."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="to_nothing", transB=1),
            helper.make_node("Gemm", ["h", "w1", "b1"], ["y"], name="from_nothing", transB=1),
        ],
        "zero_hidden",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(np.zeros((0, 4), np.float32), "w0"),
            numpy_helper.from_array(np.zeros(0, np.float32), "b0"),
            numpy_helper.from_array(np.ones((3, 0), np.float32), "w1"),
            numpy_helper.from_array(np.arange(3, dtype=np.float32), "b1"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _zero_sized_input_model() -> onnx.ModelProto:
    """x [N, 0] through a Gemm with a (3, 0) weight: the output is the bias."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="empty_gemm", transB=1)],
        "zero_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(np.zeros((3, 0), np.float32), "w"),
            numpy_helper.from_array(np.ones(3, np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("make", [_zero_hidden_mlp, _zero_sized_input_model], ids=["zero-sized weights", "zero input"])
def test_zero_sized_tensors_stay_float_and_the_model_compiles(make, tmp_path, capsys):
    path = save(make(), tmp_path / "model.onnx")
    code, err = run_cli(capsys, "compile", path, "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"] == [] and all("zero-sized" in r for r in report["kept_float"].values())
    session = ort.InferenceSession(str(tmp_path / "model.q.onnx"), providers=["CPUExecutionProvider"])
    feed = {"x": np.zeros((2, 4 if make is _zero_hidden_mlp else 0), np.float32)}
    np.testing.assert_allclose(session.run(None, feed)[0], run_model(make(), feed)[0])


# --------------------------------------------------------------------------------------------
# Bad calibration data (what tests/test_calibration.py checks through the API, here through
# the command line, plus what it does not cover)
# --------------------------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_npz(d: Path) -> Path:
    path = d / "c.npz"
    array = np.array([_TouchOnUnpickle(d / "unpickled")] * 4, dtype=object)
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as f:
        np.lib.format.write_array(f, array, allow_pickle=True)
    return path


def _npz(d: Path, **arrays) -> Path:
    np.savez(d / "c.npz", **arrays)
    return d / "c.npz"


def _x(n: int = 6, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 4)).astype(dtype)


def _with(array: np.ndarray, index: int, value: float) -> np.ndarray:
    array = array.copy()
    array.flat[index] = value
    return array


def _folder_with_unrelated_files(d: Path) -> Path:
    folder = d / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=_x())
    (folder / "README.txt").write_text("collected on 2024-05-01")
    return folder


def _two_input_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("MatMul", ["s", "w"], ["y"], name="matmul"),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


BAD_CALIBRATION = {
    "pickled objects in the npz": (_pickled_npz, "Python objects"),
    "a pickle named .npz": (lambda d: save(pickle.dumps({"x": _x()}), d / "c.npz"), "not a readable .npz"),
    "names that are not the model's": (lambda d: _npz(d, input=_x()), "unknown ['input']"),
    "an integer dtype for a float input": (lambda d: _npz(d, x=_x(dtype=np.int32)), "dtype int32"),
    "a complex dtype": (lambda d: _npz(d, x=_x().astype(np.complex64)), "dtype complex64"),
    "two axes too many": (lambda d: _npz(d, x=_x()[:, :, None, None]), "rank 4"),
    # one axis more stacks whole feeds, which then must have the input's shape
    "stacked feeds of the wrong shape": (lambda d: _npz(d, x=_x()[:, :, None]), "axis 2: 1 != 4"),
    "zero samples": (lambda d: _npz(d, x=_x(0)), "zero samples"),
    "a NaN in the first batch": (lambda d: _npz(d, x=_with(_x(), 5, np.nan)), "NaN or Inf"),
    "an Inf after the first batch": (lambda d: _npz(d, x=_with(_x(12), 20, np.inf)), "batch 1"),
    "a folder with unrelated files": (_folder_with_unrelated_files, "README.txt"),
    "a missing file": (lambda d: d / "missing.npz", "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALIBRATION))
def test_bad_calibration_data_is_refused_with_exit_code_5(case, tmp_path, capsys):
    make, fragment = BAD_CALIBRATION[case]
    calib = make(tmp_path)
    model = save(small_mlp(), tmp_path / "model.onnx")
    before, listing = sha256(model), set(os.listdir(tmp_path))
    code, err = run_cli(
        capsys, "compile", model, "--calib-data", calib, "--calib-batch", 4, "--report", tmp_path / "r.json"
    )
    assert_clean_failure(code, err, errors.CALIBRATION_DATA, tmp_path, listing, fragment)
    assert sha256(model) == before
    assert not (tmp_path / "unpickled").exists()


def test_inconsistent_sample_counts_across_inputs_are_refused(tmp_path, capsys):
    model = save(_two_input_model(), tmp_path / "model.onnx")
    calib = _npz(tmp_path, a=_x(6), b=_x(5))
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "--calib-data", calib)
    assert_clean_failure(code, err, errors.CALIBRATION_DATA, tmp_path, listing, "different sample counts")


def test_the_unpickling_marker_works_so_the_check_above_can_fail(tmp_path):
    pickle.loads(pickle.dumps(_TouchOnUnpickle(tmp_path / "unpickled")))
    assert (tmp_path / "unpickled").exists()


# --------------------------------------------------------------------------------------------
# Nothing lost
# --------------------------------------------------------------------------------------------


def test_the_input_is_unchanged_after_success_and_after_failure(tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    before = sha256(model)
    assert run_cli(capsys, "compile", model, "--calib-samples", 8)[0] == 0
    assert sha256(model) == before
    bad = _npz(tmp_path, x=_with(_x(), 0, np.nan))
    assert run_cli(capsys, "compile", model, "--calib-data", bad)[0] == errors.CALIBRATION_DATA
    assert sha256(model) == before


@pytest.mark.parametrize("spelling", ["symlink", "dot-dot", "absolute", "hard link"])
def test_an_output_that_is_the_input_under_another_name_is_refused(spelling, tmp_path, capsys, monkeypatch):
    model = save(small_mlp(), tmp_path / "model.onnx")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        output = tmp_path / "link.onnx"
        output.symlink_to(model)
    elif spelling == "hard link":
        output = tmp_path / "hard.onnx"
        os.link(model, output)
    elif spelling == "dot-dot":
        output = Path("./sub/../model.onnx")
    else:
        output = model.resolve()
    before, listing = sha256(model), set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", "model.onnx", "-o", output)
    assert_clean_failure(code, err, errors.USAGE, tmp_path, listing, "is the input model")
    assert sha256(model) == before


def test_a_verification_failure_leaves_no_output_no_report_and_no_temporary_file(tmp_path, capsys, monkeypatch):
    import ocs_onnx.passes.verify

    def cannot_load(model_bytes):
        raise RuntimeError("simulated onnxruntime failure")

    monkeypatch.setattr(ocs_onnx.passes.verify, "optimized_op_counts", cannot_load)
    model = save(small_mlp(), tmp_path / "model.onnx")
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "-q", "--calib-samples", 8, "--report", tmp_path / "r.json")
    assert_clean_failure(code, err, errors.VERIFICATION, tmp_path, listing, "simulated onnxruntime failure")


def test_a_failure_while_writing_leaves_neither_the_model_nor_the_report(tmp_path, monkeypatch):
    real_fsync = os.fsync
    calls = []

    def fsync_fails_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_second_file)
    with pytest.raises(errors.UsageError, match="No space"):
        write_files_atomic({tmp_path / "model.q.onnx": b"model", tmp_path / "report.json": b"{}"})
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    write_files_atomic({tmp_path / "model.q.onnx": b"model", tmp_path / "report.json": b"{}"})
    assert sorted(os.listdir(tmp_path)) == ["model.q.onnx", "report.json"]


def test_an_interrupt_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_files_atomic({tmp_path / "model.q.onnx": b"model"})
    assert os.listdir(tmp_path) == []


def test_two_compiles_at_once_into_different_outputs_match_a_sequential_run(tmp_path):
    model = save(builders.conv_bn_residual_net(channels=4), tmp_path / "model.onnx")
    args = ["--wbits", "5", "--calib-samples", "16", "-q"]
    ocs_onnx.compile_file(model, tmp_path / "sequential.onnx", calib_samples=16, wbits=5)
    command = [sys.executable, "-m", "ocs_onnx", "compile", str(model)]
    children = [
        subprocess.Popen(
            [*command, "-o", str(tmp_path / f"parallel{i}.onnx"), *args], stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )  # cwd: the installed ocs_onnx, not the checkout's folder
        for i in range(2)
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    expected = (tmp_path / "sequential.onnx").read_bytes()
    assert (tmp_path / "parallel0.onnx").read_bytes() == expected
    assert (tmp_path / "parallel1.onnx").read_bytes() == expected
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


# --------------------------------------------------------------------------------------------
# Wrong answers with exit 0
# --------------------------------------------------------------------------------------------


def pruned_batchnorm_net(gamma: float = 1e-7, beta: float = 4.0) -> onnx.ModelProto:
    """Conv -> BatchNorm with one pruned channel (gamma ~ 0, beta != 0) -> Relu -> Conv: folded,
    that channel's weights are ~gamma and its bias beta, which overflows int32 at the per-channel
    scale max|w|/127."""
    rng = np.random.default_rng(0)
    gammas, betas = np.ones(8, np.float32), np.zeros(8, np.float32)
    gammas[3], betas[3] = gamma, beta
    arrays = {
        "w1": rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "gamma": gammas,
        "beta": betas,
        "mean": rng.normal(0, 0.1, 8).astype(np.float32),
        "var": np.ones(8, np.float32),
        "w2": rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "pruned",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("gamma, beta", [(1e-7, 4.0), (1e-3, 1e9)])
def test_a_bias_far_larger_than_its_weights_stays_in_the_model_onnxruntime_runs(gamma, beta):
    model = pruned_batchnorm_net(gamma, beta)
    feed = {"x": np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32)}
    quantized, report = ocs_onnx.compile(model)
    conv1 = next(layer for layer in report["layers"] if layer["name"] == "conv1")
    # the pruned channel's scale (and its copy's, where conv1 computes one for conv2's split), so
    # that its bias fits int32
    assert conv1["scales_raised_for_bias"] == 1 + conv1["output_channels_computed_twice"].count(3)
    assert not any("bias" in w for w in report["warnings"])
    (expected,) = run_model(model, feed)
    # onnxruntime as it runs the model by default (fused integer kernels) keeps the bias
    assert sqnr_db(expected, run_model(quantized, feed)[0]) > 25.0
    assert report["onnxruntime"]["integer_kernels"] == 2


def _with_float_bias_on_conv1(quantized: onnx.ModelProto, bias: np.ndarray) -> onnx.ModelProto:
    """A QDQ model whose first Conv reads a float bias (as hand-made QDQ models can)."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    conv = next(n for n in model.graph.node if n.name == "conv1")
    model.graph.initializer.append(onnx.numpy_helper.from_array(bias, "conv1_float_bias"))
    conv.input[2] = "conv1_float_bias"
    return model


def test_verification_fails_when_the_integer_kernels_compute_something_else(tmp_path, capsys):
    # onnxruntime's fused QLinearConv ignores a float bias: the model it runs is not the QDQ model.
    model = pruned_batchnorm_net()
    quantized, _ = ocs_onnx.compile(model)
    folded_bias = next(t for t in quantized.graph.initializer if t.name.startswith("conv1_bias_bnfolded"))
    qdq = _with_float_bias_on_conv1(quantized, onnx.numpy_helper.to_array(folded_bias).astype(np.float32))
    path = tmp_path / "qdq.onnx"
    onnx.save(qdq, str(path))
    before = sorted(tmp_path.iterdir())
    code = main(["compile", str(path), "--abits", "none", "-q"])
    err = capsys.readouterr().err
    assert code == 6
    assert err.count("\n") == 1 and "integer kernels compute something else" in err and "nothing was written" in err
    assert sorted(tmp_path.iterdir()) == before
    # the user may opt out: then it is written, with the warning in the report
    code = main(["compile", str(path), "--abits", "none", "-q", "--min-kernel-agreement", "none"])
    assert code == 0 and (tmp_path / "qdq.q.onnx").exists()


def test_a_layer_with_a_nan_bias_stays_float_and_says_so():
    model = pruned_batchnorm_net()
    bias = next(t for t in model.graph.initializer if t.name == "b1")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[2] = np.nan
    bias.CopyFrom(onnx.numpy_helper.from_array(values, "b1"))
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "BatchNormalization"))
    model.graph.node[0].output[0] = "bn"
    _, report = ocs_onnx.compile(model, verify=False)
    assert "NaN" in report["kept_float"]["conv1"]
    assert [layer["name"] for layer in report["layers"]] == ["conv2"]


def _collision_case(case: str, tmp_path: Path) -> tuple[list, str]:
    """CLI arguments (after the model) whose outputs collide with each other or an input, and
    the fragment the refusal names."""
    calib = _npz(tmp_path, x=_x())
    return {
        "report is the output's data file": (
            ["-o", "out.onnx", "--external-data", "--report", "out.onnx.data"],
            "is also the path of -o (its data file)",
        ),
        "report is the calibration data": (
            ["--calib-data", calib, "--report", calib],
            "is calibration data (--calib-data)",
        ),
        "report is a dump": (
            ["-o", "out.onnx", "--dump-after", "name-nodes", "--report", "out.after-name-nodes.onnx"],
            "is also the path of --report",
        ),
        "dump is the input model": (
            ["-o", "model.onnx.q.onnx", "--dump-after", "name-nodes"],
            "is the input model",
        ),
    }[case]


@pytest.mark.parametrize(
    "case",
    ["report is the output's data file", "report is the calibration data", "report is a dump", "dump is the input model"],
)
def test_outputs_that_collide_with_each_other_or_with_an_input_are_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "model.onnx.q.after-name-nodes.onnx" if case == "dump is the input model" else "model.onnx"
    save(small_mlp(), tmp_path / name)
    args, fragment = _collision_case(case, tmp_path)
    before = {p: sha256(tmp_path / p) for p in os.listdir(tmp_path)}
    code, err = run_cli(capsys, "compile", name, *args)
    assert_clean_failure(code, err, errors.USAGE, tmp_path, set(before), fragment)
    assert {p: sha256(tmp_path / p) for p in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_an_output_naming_a_fifo_or_a_device_is_refused(flag, tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for special in (fifo, Path(os.devnull)):
        listing = set(os.listdir(tmp_path))
        code, err = run_cli(capsys, "compile", model, flag, special)
        assert_clean_failure(code, err, errors.USAGE, tmp_path, listing, "is not a regular file")
        assert not special.is_file()


def test_a_random_op_is_never_frozen_into_a_constant():
    w = np.random.default_rng(0).normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("RandomNormal", [], ["noise"], name="noise", shape=[1, 4, 8, 8], scale=0.1),
        helper.make_node("Add", ["x", "noise"], ["noisy"], name="add"),
        helper.make_node("Conv", ["noisy", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    quantized, _ = ocs_onnx.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert [n.op_type for n in quantized.graph.node].count("RandomNormal") == 1
    feed = {"x": np.zeros((1, 4, 8, 8), np.float32)}
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not np.array_equal(session.run(None, feed)[0], session.run(None, feed)[0])  # still a fresh draw per run


def test_an_output_listed_twice_keeps_its_name_in_both_places():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y", "w2"], ["z"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8, 8]) for n in ("y", "y", "z")]
    graph = helper.make_graph(
        nodes,
        "twice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        outputs,
        [
            numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    quantized, _ = ocs_onnx.compile(model)
    assert [(o.name, o.type) for o in quantized.graph.output] == [(o.name, o.type) for o in model.graph.output]


@pytest.mark.parametrize("kind", ["fifo", "symlink to a device"])
def test_calibration_data_that_is_not_a_regular_file_is_refused_without_reading_it(kind, tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    calib = tmp_path / ("calib.npz" if kind == "fifo" else "calib.npy")
    if kind == "fifo":
        os.mkfifo(calib)  # opening it for reading would wait for a writer forever
    else:
        calib.symlink_to("/dev/zero")  # reading it would never end
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "--calib-data", calib)
    assert_clean_failure(code, err, errors.CALIBRATION_DATA, tmp_path, listing, "not a regular file")


@pytest.mark.parametrize("args, fragment", [(["--seed", "-1"], "--seed"), (["-o", ""], "-o"), (["--report", ""], "--report")])
def test_a_negative_seed_or_an_empty_path_is_a_usage_error(args, fragment, tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, *args)
    assert_clean_failure(code, err, errors.USAGE, tmp_path, listing, fragment)


@pytest.mark.parametrize("signum, code", [(15, 143), (2, 130)])
def test_a_signal_during_a_compile_leaves_nothing_behind(signum, code, tmp_path):
    # a compile long enough to be caught in the middle (calibration of a wider net)
    model = save(builders.conv_bn_residual_net(channels=96), tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(4096, 3, 16, 16)).astype(np.float32))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    listing = set(os.listdir(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "ocs_onnx", "compile", str(model), "--calib-data", str(calib), "--calib-samples", "4096", "-v"]
    # importing onnxruntime leaves a session-id file of its own (.ses) in $TMPDIR: not ours
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True)
    scratch_listing = set(os.listdir(scratch))
    child = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    progress = []
    for line in child.stderr:  # inside the compile, however fast the machine: calibration started
        progress.append(line)
        if "pass calibrate: start" in line:
            break
    time.sleep(0.5)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, "".join(progress) + err
    lines = err.strip().splitlines()
    assert lines[-1] == f"ocs-onnx: {'terminated' if signum == 15 else 'interrupted'}; nothing was written"
    assert all(line.startswith("ocs-onnx: debug: pass ") for line in lines[:-1]), err
    assert set(os.listdir(tmp_path)) == listing
    assert set(os.listdir(scratch)) == scratch_listing


def test_a_rename_that_fails_after_another_succeeded_rolls_the_first_back(tmp_path, monkeypatch):
    (tmp_path / "model.q.onnx").write_bytes(b"the previous model")
    real_replace = os.replace
    renames = []

    def second_rename_fails(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError(30, "Read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(errors.UsageError, match="Read-only"):
        write_files_atomic({tmp_path / "model.q.onnx": b"new model", tmp_path / "report.json": b"{}"})
    monkeypatch.setattr(os, "replace", real_replace)
    # the replaced model is back, the report never appeared, nothing temporary is left
    assert sorted(os.listdir(tmp_path)) == ["model.q.onnx"]
    assert (tmp_path / "model.q.onnx").read_bytes() == b"the previous model"


def test_a_full_disk_while_writing_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    model = save(small_mlp(), tmp_path / "model.onnx")
    listing = set(os.listdir(tmp_path))

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, err = run_cli(capsys, "compile", model, "--calib-samples", "4", "-q")
    assert_clean_failure(code, err, errors.USAGE, tmp_path, listing, "cannot write", "model.q.onnx", "No space left")


def test_an_output_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "-o", tmp_path / ("m" * 250 + ".onnx"))
    assert_clean_failure(code, err, errors.USAGE, tmp_path, listing, "file name too long")


def _damaged_npz(tmp_path: Path, damage: str) -> Path:
    """A valid .npz for small_mlp (input x, 4 features), then damaged."""
    path = tmp_path / "calib.npz"
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    if damage == "fortran, truncated":
        npy = tmp_path / "calib.npy"
        with open(npy, "wb") as f:
            np.lib.format.write_array(f, np.asfortranarray(x))
        npy.write_bytes(npy.read_bytes()[:-40])
        return npy
    if damage == "header claims 10^12 samples":
        npy = tmp_path / "calib.npy"
        with open(npy, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": True, "shape": (10**12, 4)})
            f.write(x.tobytes())
        return npy
    np.savez_compressed(path, x=x)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    central = data.rfind(b"PK\x01\x02")  # the member's central directory entry
    if damage == "bad CRC":
        # the stored CRC of the member (local header and central directory) no longer matches
        for offset in (info.header_offset + 14, central + 16):
            data[offset] ^= 0xFF
    elif damage == "encrypted":  # general-purpose flag bit 0, in both headers
        data[info.header_offset + 6] |= 1
        data[central + 8] |= 1
    elif damage == "deflate64":  # compression method 9, which zipfile cannot read
        data[info.header_offset + 8] = 9
        data[central + 10] = 9
    elif damage == "needs zip version 25.1":
        data[info.header_offset + 4] = 251
        data[central + 6] = 251
    else:  # corrupt deflate data
        for offset in range(start + 10, start + 40):
            data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "damage",
    ["bad CRC", "corrupt deflate", "encrypted", "deflate64", "needs zip version 25.1", "fortran, truncated",
     "header claims 10^12 samples"],
)
def test_a_damaged_calibration_file_is_a_calibration_data_error(damage, tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    calib = _damaged_npz(tmp_path, damage)
    listing = set(os.listdir(tmp_path))
    code, err = run_cli(capsys, "compile", model, "--calib-data", calib, "-q")
    assert_clean_failure(code, err, errors.CALIBRATION_DATA, tmp_path, listing, calib.name)


# --------------------------------------------------------------------------------------------
# What the written files look like
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_outputs_get_the_umask_permissions_and_replaced_ones_keep_theirs(umask, tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "out.json"
    previous = os.umask(umask)
    try:
        assert run_cli(capsys, "compile", model, "-o", out, "--report", report, "-q")[0] == 0
        assert [path.stat().st_mode & 0o777 for path in (out, report)] == [0o666 & ~umask] * 2  # as cp makes them
        out.chmod(0o640)
        assert run_cli(capsys, "compile", model, "-o", out, "-q")[0] == 0
        assert out.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its permissions
    finally:
        os.umask(previous)


def test_a_path_with_a_newline_stays_on_one_line_in_the_error(tmp_path, capsys):
    model = save(small_mlp(), tmp_path / "model.onnx")
    code, err = run_cli(capsys, "compile", model, "-o", tmp_path / "no\nsuch" / "out.onnx")
    assert code == errors.USAGE
    assert err.count("\n") == 1 and "no\\nsuch" in err
    code, err = run_cli(capsys, "compile", tmp_path / "bad\rname.onnx")
    assert code == errors.INVALID_MODEL
    assert err.count("\n") == 1 and "bad\\rname.onnx: no such file" in err


def test_a_signal_while_the_output_is_renamed_into_place_lets_the_write_finish(tmp_path, capsys, monkeypatch):
    # From the first rename on, "nothing was written" would be false: the interrupt is noted
    # and the compile ends as it would have.
    import signal

    from ocs_onnx import writing

    rename_all = writing._rename_all

    def rename_with_a_signal(pending):
        if any(path.name == "out.onnx" for path in pending):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # what delivery would run
        rename_all(pending)

    monkeypatch.setattr(writing, "_rename_all", rename_with_a_signal)
    model = save(small_mlp(), tmp_path / "model.onnx")
    code, err = run_cli(capsys, "compile", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json", "-q")
    assert (code, err) == (0, "")
    assert onnx.load(str(tmp_path / "out.onnx")).graph.output and json.loads((tmp_path / "r.json").read_text())

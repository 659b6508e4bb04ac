"""Odd but valid models: each compiles to a model with the same interface that computes what
the input computes (within quantization error), or is refused with one line and the exit code
the README documents. Never an internal error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ocs_onnx
from ocs_onnx import errors
from ocs_onnx.cli import main
from ocs_onnx.quant import sqnr_db

RNG = np.random.default_rng(0)


def _weight(name: str, shape=(4, 3, 3, 3)) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def _value(name: str, shape, elem_type=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _model(nodes, inputs, outputs, initializers=(), opset=17, **graph_fields) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **graph_fields)
    functions = graph_fields.pop("functions", None)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=functions)


def _conv(x="x", w="W", y="y") -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], pads=[1, 1, 1, 1])


X = _value("x", [1, 3, 8, 8])
Y = _value("y", [1, 4, 8, 8])


def compile_cli(capsys, model: onnx.ModelProto, folder: Path, *args, quiet=True) -> tuple[int, str, Path, dict]:
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    out, report = folder / "out.onnx", folder / "report.json"
    code = main(["compile", str(path), "-o", str(out), "--report", str(report), *(["-q"] if quiet else []), *args])
    err = capsys.readouterr().err
    return code, err, out, (json.loads(report.read_text()) if report.exists() else {})


def outputs_of(path_or_model, feed) -> dict[str, np.ndarray]:
    source = path_or_model if isinstance(path_or_model, (str, Path)) else path_or_model.SerializeToString()
    session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def assert_same_interface_and_close(model: onnx.ModelProto, out: Path, feed, min_db: float = 25.0) -> None:
    compiled = onnx.load(str(out))
    assert [i.name for i in compiled.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in compiled.graph.output] == [o.name for o in model.graph.output]
    expected, actual = outputs_of(model, feed), outputs_of(out, feed)
    for name, value in expected.items():
        assert close(value, actual[name], min_db), name


def close(expected: np.ndarray, actual: np.ndarray, min_db: float) -> bool:
    """Equal, or within quantization noise (SQNR above ``min_db``)."""
    if np.array_equal(expected, actual):
        return True
    db = sqnr_db(expected, actual)
    return db is not None and db > min_db


def test_a_graph_input_that_is_also_a_graph_output_stays_both(tmp_path, capsys):
    model = _model([_conv()], [X], [Y, X], [_weight("W")])
    code, err, out, _ = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    feed = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    assert_same_interface_and_close(model, out, feed)
    np.testing.assert_array_equal(outputs_of(out, feed)["x"], feed["x"])  # the input, as given


def test_an_optional_op_between_layers_compiles(tmp_path, capsys):
    nodes = [_conv(), helper.make_node("Optional", ["y"], ["o"]), helper.make_node("OptionalGetElement", ["o"], ["z"])]
    model = _model(nodes, [X], [_value("z", [1, 4, 8, 8])], [_weight("W")], opset=18)
    code, err, out, report = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    assert report["totals"]["quantized_layers"] == 1
    assert_same_interface_and_close(model, out, {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)})


def test_an_optional_graph_output_is_refused_as_unsupported(tmp_path, capsys):
    optional = helper.make_value_info(
        "o", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4, 8, 8]))
    )
    model = _model([_conv(), helper.make_node("Optional", ["y"], ["o"])], [X], [optional], [_weight("W")], opset=18)
    listing = set(os.listdir(tmp_path)) | {"model.onnx"}
    code, err, _, _ = compile_cli(capsys, model, tmp_path)
    assert code == errors.UNSUPPORTED_MODEL, err
    assert err.strip().splitlines() == [err.strip()] and "model output 'o' is a optional_type" in err
    assert set(os.listdir(tmp_path)) == listing


def test_a_scalar_input_compiles(tmp_path, capsys):
    nodes = [_conv(y="c"), helper.make_node("Mul", ["c", "s"], ["y"])]
    model = _model(nodes, [X, _value("s", [])], [Y], [_weight("W")])
    code, err, out, _ = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    feed = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32), "s": np.asarray(0.5, np.float32)}
    assert_same_interface_and_close(model, out, feed)


def _sparse(dense: np.ndarray, name: str, coordinates: bool) -> onnx.SparseTensorProto:
    nonzero = np.argwhere(dense) if coordinates else np.flatnonzero(dense)
    values = dense[tuple(nonzero.T)] if coordinates else dense.ravel()[nonzero]
    return helper.make_sparse_tensor(
        numpy_helper.from_array(values.astype(np.float32), name),
        numpy_helper.from_array(nonzero.astype(np.int64), f"{name}_indices"),
        list(dense.shape),
    )


@pytest.mark.parametrize("coordinates", [False, True], ids=["linear indices", "coordinate indices"])
def test_a_sparse_initializer_weight_is_quantized_as_the_dense_weight_it_stands_for(coordinates, tmp_path, capsys):
    dense = RNG.normal(size=(16, 8)).astype(np.float32)
    dense[np.abs(dense) < 0.7] = 0
    model = _model(
        [helper.make_node("MatMul", ["x", "B"], ["y"])],
        [_value("x", ["N", 16])],
        [_value("y", ["N", 8])],
        sparse_initializer=[_sparse(dense, "B", coordinates)],
    )
    code, err, out, report = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    assert err == ""  # no warning: the weight is float32, as the sparse tensor says
    assert report["totals"]["quantized_layers"] == 1 and report["kept_float"] == {}
    x = RNG.normal(size=(32, 16)).astype(np.float32)
    assert close(x @ dense, outputs_of(out, {"x": x})["y"], 30)


def test_a_model_without_inputs_compiles_from_one_run(tmp_path, capsys):
    x = numpy_helper.from_array(RNG.normal(size=(1, 3, 8, 8)).astype(np.float32), "x")
    model = _model([_conv()], [], [Y], [_weight("W"), x])
    code, err, out, report = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    assert report["calibration"]["samples"] == 1
    assert_same_interface_and_close(model, out, {})


def test_a_string_input_gets_synthetic_strings(tmp_path, capsys):
    nodes = [_conv(), helper.make_node("Identity", ["s"], ["s2"])]
    model = _model(nodes, [X, _value("s", [1], TensorProto.STRING)], [Y, _value("s2", [1], TensorProto.STRING)], [_weight("W")])
    code, err, out, _ = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    feed = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32), "s": np.array(["text"], dtype=object)}
    compiled = outputs_of(out, feed)
    assert compiled["s2"].tolist() == ["text"]
    assert close(outputs_of(model, feed)["y"], compiled["y"], 25)


def test_a_declared_input_too_large_to_make_synthetic_data_for_is_a_calibration_data_error(tmp_path, capsys):
    model = _model([_conv()], [_value("x", [1, 3, 10**6, 10**6])], [_value("y", [1, 4, 10**6, 10**6])], [_weight("W")])
    listing = set(os.listdir(tmp_path)) | {"model.onnx"}
    code, err, _, _ = compile_cli(capsys, model, tmp_path)
    assert code == errors.CALIBRATION_DATA, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "more than the 256 MiB ocs-onnx generates" in lines[0] and "--calib-data" in lines[0]
    assert set(os.listdir(tmp_path)) == listing


def test_more_synthetic_samples_than_the_cap_are_capped_and_it_says_so(tmp_path, capsys):
    model = _model([_conv()], [_value("x", ["N", 3, 8, 8])], [_value("y", ["N", 4, 8, 8])], [_weight("W")])
    code, err, _, report = compile_cli(capsys, model, tmp_path, "--calib-samples", str(10**12), quiet=False)
    assert code == 0
    assert "synthetic calibration uses at most 1,024 samples" in err
    assert report["calibration"]["samples"] == 1024


def _if_model() -> onnx.ModelProto:
    then_branch = helper.make_graph([_conv("x", "Wb", "t")], "then", [], [_value("t", [1, 4, 8, 8])], [_weight("Wb")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "else", [], [_value("e", [1, 4, 8, 8])])
    nodes = [
        _conv(),
        helper.make_node("ReduceSum", ["x"], ["r"], keepdims=0),
        helper.make_node("Greater", ["r", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    zero = numpy_helper.from_array(np.asarray(0, np.float32), "zero")
    return _model(nodes, [X], [_value("z", [1, 4, 8, 8])], [_weight("W"), zero])


def _function_model() -> onnx.ModelProto:
    function = helper.make_function(
        "local", "ConvTwice", ["a", "w"], ["b"],
        [helper.make_node("Conv", ["a", "w"], ["m"], pads=[1, 1, 1, 1]), helper.make_node("Conv", ["m", "w"], ["b"], pads=[1, 1, 1, 1])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [_conv(y="y0"), helper.make_node("ConvTwice", ["y0", "W2"], ["y"], name="twice", domain="local")]
    graph = helper.make_graph(nodes, "g", [X], [Y], [_weight("W"), _weight("W2", (4, 4, 3, 3))])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[function])


@pytest.mark.parametrize(
    "make, node, reason",
    [
        (_if_model, "branch", "1 Conv in the bodies of this If node"),
        (_function_model, "twice", "2 Conv in the model-local function local.ConvTwice it calls"),
    ],
    ids=["If body", "local function"],
)
def test_layers_inside_subgraphs_and_functions_are_listed_as_kept_float(make, node, reason, tmp_path, capsys):
    model = make()
    code, err, out, report = compile_cli(capsys, model, tmp_path)
    assert code == 0, err
    assert report["kept_float"] == {node: f"{reason}: kept float (layers inside subgraphs and functions are not quantized)"}
    assert report["totals"]["quantized_layers"] == 1  # the top-level Conv
    assert_same_interface_and_close(model, out, {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)})


def test_compiling_a_model_object_with_sparse_weights_leaves_it_unchanged():
    dense = RNG.normal(size=(16, 8)).astype(np.float32)
    dense[np.abs(dense) < 0.7] = 0
    model = _model([helper.make_node("MatMul", ["x", "B"], ["y"])], [_value("x", ["N", 16])], [_value("y", ["N", 8])],
                   sparse_initializer=[_sparse(dense, "B", coordinates=False)])
    before = model.SerializeToString()
    ocs_onnx.compile(model, abits=None)
    assert model.SerializeToString() == before


def test_a_sparse_weight_with_an_index_out_of_range_is_an_invalid_model(tmp_path, capsys):
    sparse = _sparse(np.eye(4, dtype=np.float32), "B", coordinates=False)
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([-1, 5, 10, 15], np.int64), "B_indices"))
    model = _model([helper.make_node("MatMul", ["x", "B"], ["y"])], [_value("x", ["N", 4])], [_value("y", ["N", 4])],
                   sparse_initializer=[sparse])
    code, err, _, _ = compile_cli(capsys, model, tmp_path)
    assert code == errors.INVALID_MODEL and "sparse initializer 'B'" in err and len(err.strip().splitlines()) == 1


def test_large_synthetic_samples_are_generated_a_few_at_a_time(tmp_path, capsys, monkeypatch):
    import ocs_onnx.passes.calibrate as calibrate
    from ocs_onnx import calibration

    model = _model([_conv()], [_value("x", ["N", 3, 1024, 1024])], [_value("y", ["N", 4, 1024, 1024])], [_weight("W")])
    sample = calibration.synthetic_sample_bytes(calibration.model_input_specs(model))
    assert sample == 3 * 1024 * 1024 * 8  # generated as 8-byte values: 24 MiB a sample
    monkeypatch.setattr(calibrate, "SYNTHETIC_BATCH_MAX_BYTES", 2 * sample)  # two samples a batch
    code, err, _, report = compile_cli(capsys, model, tmp_path, "--calib-samples", "5", "--no-verify")
    assert code == 0, err
    assert report["calibration"]["batch"] == 2 and report["calibration"]["samples"] == 5

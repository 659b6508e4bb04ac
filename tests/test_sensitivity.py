"""Sensitivity analysis and the accuracy target: what each quantized tensor costs the outputs,
measured on samples calibration did not use, and the fewest tensors kept float to reach
``--target-sqnr`` (exit 7 and nothing written when no quantized model reaches it)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from ocs_onnx import compile, compile_file
from ocs_onnx.calibration import model_input_specs, open_calibration_data
from ocs_onnx.cli import main
from ocs_onnx.errors import ACCURACY_TARGET, CALIBRATION_DATA, USAGE, AccuracyTargetError, UsageError
from ocs_onnx.passes.sensitivity import ranking_samples
from ocs_onnx.sensitivity import OutputError, fewest_prefix

from models import digits

from .conftest import run_model

HELD_OUT = 16


@pytest.fixture
def demo(tmp_path) -> Path:
    """A private copy of the demo model."""
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(digits.MODEL, model)
    return model


def _held_out_images(count: int = HELD_OUT) -> np.ndarray:
    with np.load(digits.CALIBRATION) as data:
        return data["image"][-count:]


def _sqnr_db(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return 10 * math.log10(np.sum(expected**2) / np.sum((expected - actual.astype(np.float64)) ** 2))


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def test_every_quantized_weight_and_activation_gets_its_output_sqnr_alone():
    _, report = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True)
    sensitivity = report["sensitivity"]
    assert sensitivity["held_out_samples"] == HELD_OUT
    assert sensitivity["ranking_samples"] == 4
    assert report["calibration"]["samples"] == 128  # of 200: the last 16 are not calibration's
    assert report["calibration"]["held_out_samples"] == HELD_OUT
    weights = [c for c in sensitivity["candidates"] if c["kind"] == "weight"]
    assert sorted(c["name"] for c in weights) == sorted(layer["name"] for layer in report["layers"])
    members = {m for c in sensitivity["candidates"] if c["kind"] == "activation" for m in c["members"]}
    assert members == set(report["activations"])
    alone = [c["output_sqnr_db_alone"] for c in sensitivity["candidates"]]
    assert alone == sorted(alone)  # most sensitive first
    # one tensor alone costs less than all of them together
    assert all(value > sensitivity["output_sqnr_db"]["as_quantized"] for value in alone)
    assert all(layer["sensitivity_db"] is not None and not layer["kept_float_for_target"] for layer in report["layers"])
    assert sensitivity["kept_float"] == [] and sensitivity["target_sqnr_db"] is None


def test_activations_behind_data_movement_on_one_grid_are_one_candidate():
    # the demo's Flatten after GlobalAveragePool: quantizing it again on the same grid changes
    # nothing, so keeping only one of the two float would change nothing either
    _, report = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True)
    groups = [sorted(c["members"]) for c in report["sensitivity"]["candidates"] if c["kind"] == "activation"]
    assert ["flatten_out", "gap_out"] in groups


def test_the_analysis_leaves_the_compiled_model_as_it_is():
    plain, _ = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, holdout_samples=HELD_OUT)
    analyzed, _ = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True)
    # the plain compile calibrates on all 128 first samples too (200 - 16 >= 128)
    assert plain.SerializeToString() == analyzed.SerializeToString()


def test_a_target_keeps_the_most_sensitive_tensors_float_and_holds_on_the_held_out_samples(tmp_path):
    _, baseline = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True)
    quantized_db = baseline["sensitivity"]["output_sqnr_db"]["as_quantized"]
    target = quantized_db + 3.0
    output, report = compile_file(
        digits.MODEL, tmp_path / "q.onnx", calib_data=digits.CALIBRATION, target_sqnr_db=target
    )
    sensitivity = report["sensitivity"]
    kept = sensitivity["kept_float"]
    ranked = [c["name"] for c in sensitivity["candidates"]]
    assert kept and kept == ranked[: len(kept)]  # the most sensitive, as few as the target allows
    assert sensitivity["output_sqnr_db"]["final"] >= target
    # the written model, run by hand on the held-out samples, reaches what the report says
    images = _held_out_images()
    expected = run_model(onnx.load(str(digits.MODEL)), {"image": images})[0]
    actual = run_model(onnx.load(str(output)), {"image": images})[0]
    assert _sqnr_db(expected, actual) == pytest.approx(sensitivity["output_sqnr_db"]["final"], abs=0.01)
    assert _sqnr_db(expected, actual) >= target
    # the kept weights are float in the model, the others int8
    model = onnx.load(str(output))
    readers = {n.name: n for n in model.graph.node}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    for layer in report["layers"]:
        weight = readers[layer["name"]].input[1]
        dequantized = weight in produced_by and produced_by[weight].op_type == "DequantizeLinear"
        assert dequantized != layer["kept_float_for_target"], layer["name"]
    assert report["onnxruntime"]["integer_kernels"] < baseline["onnxruntime"]["integer_kernels"]


def test_a_target_the_compiled_model_meets_changes_nothing():
    plain, _ = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True)
    met, report = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, target_sqnr_db=0.0)
    assert report["sensitivity"]["kept_float"] == []
    assert met.SerializeToString() == plain.SerializeToString()


def test_a_softmax_output_is_measured_at_its_logits():
    model = onnx.load(str(digits.MODEL))
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=-1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 10]))
    compiled, report = compile(model, calib_data=digits.CALIBRATION, sensitivity=True)
    images = _held_out_images()
    expected = run_model(_with_output(model, logits), {"image": images})[1]
    actual = run_model(_with_output(compiled, logits), {"image": images})[1]
    assert report["sensitivity"]["output_sqnr_db"]["as_quantized"] == pytest.approx(_sqnr_db(expected, actual), abs=0.01)


def test_an_unreachable_target_exits_7_and_writes_nothing(demo, tmp_path, capsys):
    output, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["compile", str(demo), "-o", str(output), "--report", str(report),
                 "--calib-data", str(digits.CALIBRATION), "--target-sqnr", "300"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == ACCURACY_TARGET == 7
    assert err.count("\n") == 1 and "accuracy target not met" in err and "nothing was written" in err
    assert not output.exists() and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.name]


def test_a_target_that_needs_every_activation_float_is_not_met():
    # weight-only quantization's output SQNR, demanded of W8A8: only with every activation float
    _, weight_only = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, abits=None, sensitivity=True)
    reachable = weight_only["sensitivity"]["output_sqnr_db"]["as_quantized"]
    with pytest.raises(AccuracyTargetError, match="every activation float|of the weights float"):
        compile(str(digits.MODEL), calib_data=digits.CALIBRATION, target_sqnr_db=reachable + 20)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--target-sqnr", "30"], USAGE, "--target-sqnr needs --calib-data"),
        (["--sensitivity"], USAGE, "--sensitivity needs --calib-data"),
        (["--target-sqnr", "nan", "--calib-data", str(digits.CALIBRATION)], USAGE, "--target-sqnr must be a number"),
        (["--holdout-samples", "0", "--sensitivity", "--calib-data", str(digits.CALIBRATION)], USAGE, "--holdout-samples"),
    ],
)
def test_bad_analysis_options_are_usage_errors(demo, capsys, args, code, message):
    assert main(["compile", str(demo), *args]) == code
    assert message in capsys.readouterr().err


def test_a_single_calibration_sample_leaves_none_to_hold_out(demo, tmp_path, capsys):
    one = tmp_path / "one.npz"
    np.savez(one, image=_held_out_images(1))
    assert main(["compile", str(demo), "--calib-data", str(one), "--sensitivity"]) == CALIBRATION_DATA
    assert "needs at least 2" in capsys.readouterr().err


def test_held_out_batches_are_the_last_samples_across_files(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    images = np.arange(10 * 64, dtype=np.float32).reshape(10, 1, 8, 8)
    np.save(folder / "a.npy", images[:6])
    np.save(folder / "b.npy", images[6:])
    data = open_calibration_data(folder, model_input_specs(onnx.load(str(digits.MODEL))))
    for skip in (0, 3, 6, 8):
        rows = np.concatenate([feed["image"] for feed in data.batches(10, 4, skip=skip)])
        np.testing.assert_array_equal(rows, images[skip:])


def test_fewest_prefix_finds_the_smallest_k_and_says_when_there_is_none():
    for threshold in range(0, 41):
        calls = []

        def meets(k):
            calls.append(k)
            return k >= threshold

        assert fewest_prefix(meets, 40) == threshold
        assert len(calls) <= 2 * math.ceil(math.log2(threshold + 1)) + 2
    assert fewest_prefix(lambda k: False, 40) is None
    assert fewest_prefix(lambda k: True, 0) == 0


def test_output_error_is_the_worst_outputs_sqnr():
    reference = {"a": np.array([3.0, 4.0], dtype=np.float32), "b": np.array([1.0, 0.0], dtype=np.float32)}
    error = OutputError([reference])
    # a: 25 / 1 (14.0 dB), b: 1 / 0.01 (20 dB)
    run = {"a": np.array([3.0, 5.0], dtype=np.float32), "b": np.array([1.1, 0.0], dtype=np.float32)}
    assert error.sqnr_db([run]) == pytest.approx(10 * math.log10(25), abs=1e-6)
    assert error.sqnr_db([reference]) == math.inf
    broken = {"a": np.array([3.0, np.nan], dtype=np.float32), "b": reference["b"]}
    assert error.sqnr_db([broken]) == -math.inf


def _eval_sqnr_metric(calls: list[str]):
    """A task metric as a user writes one: the model's output SQNR against the float model on the
    demo's evaluation images (the float model scores the cap, 100)."""
    with np.load(digits.EVALUATION) as data:
        images = data["image"][:64]
    expected = run_model(onnx.load(str(digits.MODEL)), {"image": images})[0]

    def metric(path: str) -> float:
        calls.append(path)
        actual = run_model(onnx.load(path), {"image": images})[0]
        return 100.0 if np.array_equal(actual, expected) else min(100.0, _sqnr_db(expected, actual))

    return metric


def test_a_user_metric_and_max_drop_keep_float_what_the_metric_needs():
    calls: list[str] = []
    metric = _eval_sqnr_metric(calls)
    _, plain = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True, metric=metric, max_drop=100)
    as_quantized = plain["sensitivity"]["metric"]["as_quantized"]
    assert plain["sensitivity"]["kept_float"] == []  # a drop of 100 allows anything
    calls.clear()
    drop = 100 - (as_quantized + 3)  # three dB more than the compiled model has
    compiled, report = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, metric=metric, max_drop=drop)
    sensitivity = report["sensitivity"]
    assert sensitivity["metric"]["float"] == 100.0 and sensitivity["metric"]["max_drop"] == drop
    assert sensitivity["kept_float"] == [c["name"] for c in sensitivity["candidates"]][: len(sensitivity["kept_float"])]
    assert sensitivity["kept_float"] and sensitivity["metric"]["final"] >= as_quantized + 3
    # the metric judged the model that was returned
    with np.load(digits.EVALUATION) as data:
        images = data["image"][:64]
    expected = run_model(onnx.load(str(digits.MODEL)), {"image": images})[0]
    assert _sqnr_db(expected, run_model(compiled, {"image": images})[0]) == pytest.approx(
        sensitivity["metric"]["final"], abs=1e-6
    )
    assert str(digits.MODEL) in calls  # the float model, by its own path
    assert not any(Path(p).exists() for p in calls if p != str(digits.MODEL))  # candidates removed
    assert report["config"]["metric"].endswith("metric")


def test_a_model_given_in_memory_is_scored_from_a_temporary_copy():
    calls: list[str] = []
    _, report = compile(onnx.load(str(digits.MODEL)), calib_data=digits.CALIBRATION, metric=_eval_sqnr_metric(calls), max_drop=100)
    assert report["sensitivity"]["metric"]["float"] == 100.0
    assert calls and not any(Path(p).exists() for p in calls)


def test_an_unreachable_metric_drop_is_exit_7():
    with pytest.raises(AccuracyTargetError, match="metric drop of at most 0"):
        compile(str(digits.MODEL), calib_data=digits.CALIBRATION, metric=_eval_sqnr_metric([]), max_drop=0.0)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(metric=lambda path: 1.0), "metric and max_drop go together"),
        (dict(max_drop=1.0), "metric and max_drop go together"),
        (dict(metric="accuracy", max_drop=1.0), "metric must be a callable"),
        (dict(metric=lambda path: 1.0, max_drop=-1), "max_drop must be a non-negative number"),
        (dict(metric=lambda path: float("nan"), max_drop=1.0), "it must return a finite number"),
    ],
)
def test_bad_metric_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        compile(str(digits.MODEL), calib_data=digits.CALIBRATION, **options)


def test_large_samples_rank_on_fewer_of_them():
    assert ranking_samples(16, 3 * 48 * 320) == 4  # a text line
    assert ranking_samples(16, 3 * 640 * 640) == 1  # a page
    assert ranking_samples(2, 64) == 2  # as many as there are

"""``ocs-onnx compare``: a candidate model's outputs against a reference's on the same inputs,
as onnxruntime serves both."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from ocs_onnx import compile_file
from ocs_onnx.cli import main
from ocs_onnx.errors import USAGE

from models import builders, digits

from .conftest import run_model


def _sqnr_db(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return 10 * math.log10(np.sum(expected**2) / np.sum((expected - actual.astype(np.float64)) ** 2))


def test_compare_gives_the_sqnr_computed_by_hand(tmp_path, capsys):
    compiled = tmp_path / "q.onnx"
    compile_file(digits.MODEL, compiled, calib_data=digits.CALIBRATION)
    with np.load(digits.CALIBRATION) as data:
        images = data["image"][:40]
    expected = run_model(onnx.load(str(digits.MODEL)), {"image": images})[0]
    actual = run_model(onnx.load(str(compiled)), {"image": images})[0]
    assert main(["compare", str(digits.MODEL), str(compiled), "--data", str(digits.CALIBRATION),
                 "--samples", "40", "--batch", "16", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 40 and result["inputs"] == str(digits.CALIBRATION)
    logits = result["outputs"]["logits"]
    assert logits["shape"] == [40, 10]
    assert logits["sqnr_db"] == pytest.approx(_sqnr_db(expected, actual), abs=1e-3)
    assert logits["max_abs_error"] == pytest.approx(float(np.abs(expected - actual).max()), rel=1e-6)
    assert logits["argmax_agreement"] == pytest.approx(float(np.mean(expected.argmax(1) == actual.argmax(1))))
    cosine = float(np.sum(expected * actual) / np.sqrt(np.sum(expected**2) * np.sum(actual**2)))
    assert logits["cosine"] == pytest.approx(cosine, rel=1e-6)
    # the table for people says the same
    assert main(["compare", str(digits.MODEL), str(compiled), "--data", str(digits.CALIBRATION), "--samples", "40"]) == 0
    table = capsys.readouterr().out
    assert f"{logits['sqnr_db']:.2f} dB" in table and "40 samples" in table


def test_compare_of_a_model_with_itself_is_exact(capsys):
    assert main(["compare", str(digits.MODEL), str(digits.MODEL), "--json"]) == 0
    logits = json.loads(capsys.readouterr().out)["outputs"]["logits"]
    assert logits["sqnr_db"] is None and logits["max_abs_error"] == 0.0 and logits["argmax_agreement"] == 1.0


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing", 3, "no such file"),
        ("other inputs", USAGE, "different inputs"),
        ("bad samples", USAGE, "--samples must be a positive integer"),
    ],
)
def test_compare_refuses_what_it_cannot_compare(case, code, message, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    onnx.save(builders.mlp_gemm(), other)
    args = {
        "missing": [str(digits.MODEL), str(tmp_path / "none.onnx")],
        "other inputs": [str(digits.MODEL), str(other)],
        "bad samples": [str(digits.MODEL), str(digits.MODEL), "--samples", "0"],
    }[case]
    assert main(["compare", *args]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_compare_runs_on_every_test_model(test_model, tmp_path, capsys):
    name, model = test_model
    original, compiled = tmp_path / f"{name}.onnx", tmp_path / f"{name}.q.onnx"
    onnx.save(model, original)
    compile_file(original, compiled)
    assert main(["compare", str(original), str(compiled), "--samples", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 4 and result["inputs"] == "synthetic"
    float_outputs = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    assert sorted(result["outputs"]) == sorted(float_outputs)
    for statistics in result["outputs"].values():
        assert all(isinstance(d, int) and d > 0 for d in statistics["shape"])
        assert statistics["sqnr_db"] is None or np.isfinite(statistics["sqnr_db"])
        assert statistics["max_abs_error"] is not None and statistics["max_abs_error"] >= 0

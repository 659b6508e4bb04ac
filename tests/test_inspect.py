"""``ocs-onnx inspect``: per layer, how its weights' outliers look to a quantizer and what OCS
would do for them; with data, how its input's channels spread and how sensitive the outputs
are to each quantized tensor."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from ocs_onnx import compile
from ocs_onnx.cli import main
from ocs_onnx.inspection import (
    channel_spread,
    ratio_halving_error,
    weight_error_at_ratio,
    weight_outlier_statistics,
)

from models import builders, digits


def test_inspect_runs_on_every_test_model_and_lists_the_layers_the_compiler_quantizes(test_model, tmp_path, capsys):
    name, model = test_model
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, report = compile(str(path), abits=None)
    assert [layer["name"] for layer in result["layers"]] == [layer["name"] for layer in report["layers"]]
    for layer in result["layers"]:
        assert layer["max_over_std"] is None or layer["max_over_std"] >= 1.0
        assert 0.0 <= layer["range_only_top_channel"] <= 1.0
        assert layer["ratio_halving_weight_error"] in (None, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    assert result["sensitivity"] is None
    assert main(["inspect", str(path)]) == 0
    assert "OCS ratio halving error" in capsys.readouterr().out


def test_the_weight_error_at_a_ratio_is_the_one_the_compiler_gets():
    model = builders.two_branch_conv_net(outlier_channel=3)
    _, report = compile(model, abits=None, wbits=6, granularity="tensor", ratio=0.05, ocs_guard=False,
                        min_split_gain_db=0.0)  # fmt: skip
    layer = next(entry for entry in report["layers"] if entry["name"] == "branch_a/conv")
    weight = _folded_weight(model, "branch_a/conv")
    mse = weight_error_at_ratio(weight, 1, None, 0.05, 6)
    assert 10 * math.log10(np.mean(weight.astype(np.float64) ** 2) / mse) == pytest.approx(layer["sqnr_db"]["with_ocs"], abs=0.01)


def _folded_weight(model: onnx.ModelProto, layer: str) -> np.ndarray:
    """The layer's weight as the compiler quantizes it (after BatchNorm folding)."""
    from ocs_onnx.compiler import compile_graph
    from ocs_onnx.config import CompileConfig
    from ocs_onnx.facts import LAYERS
    from ocs_onnx.loading import load_model

    _, ctx = compile_graph(load_model(model), CompileConfig(abits=None, stop_after="select-layers"), "x", None)
    return next(entry.model_weight for entry in ctx.facts[LAYERS] if entry.name == layer)


def test_the_ratio_that_halves_the_error_is_the_smallest_that_does():
    weight = _folded_weight(builders.two_branch_conv_net(outlier_channel=3), "branch_a/conv")
    ratio = ratio_halving_error(weight, 1, None, 6)
    assert ratio is not None
    base = weight_error_at_ratio(weight, 1, None, 0.0, 6)
    assert weight_error_at_ratio(weight, 1, None, ratio, 6) <= base / 2
    smaller = [r for r in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5) if r < ratio]
    assert all(weight_error_at_ratio(weight, 1, None, r, 6) > base / 2 for r in smaller)


def test_outlier_statistics_by_hand():
    w = np.ones((2, 4), dtype=np.float32)  # 2 outputs x 4 input channels
    w[0, 2] = 5.0
    stats = weight_outlier_statistics(w, in_axis=1)
    values = w.ravel().astype(np.float64)
    assert stats["max_over_std"] == pytest.approx(5.0 / values.std())
    assert stats["kurtosis"] == pytest.approx(np.mean((values - values.mean()) ** 4) / values.var() ** 2 - 3)
    assert stats["range_only_top_channel"] == pytest.approx(1 - 1 / 5)
    assert channel_spread(np.array([1.0, 2.0, 8.0])) == pytest.approx(4.0)
    assert channel_spread(np.zeros(3)) is None


def test_with_data_inspect_adds_input_spreads_and_the_compilers_sensitivity_ranking(capsys):
    assert main(["inspect", str(digits.MODEL), "--calib-data", str(digits.CALIBRATION), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, report = compile(str(digits.MODEL), calib_data=digits.CALIBRATION, sensitivity=True)
    expected = [(c["name"], c["output_sqnr_db_alone"]) for c in report["sensitivity"]["candidates"]]
    assert [(c["name"], c["output_sqnr_db_alone"]) for c in result["sensitivity"]["candidates"]] == expected
    for layer in result["layers"]:
        assert layer["input_channel_spread"] >= 1.0
        assert layer["sensitivity_db"] == dict(expected)[layer["name"]]
    # the first layer reads the image, one channel: nothing to spread
    assert result["layers"][0]["input_channel_spread"] == 1.0


def test_inspect_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.onnx")]) == 3
    assert main(["inspect", str(digits.MODEL), "--samples", "0", "--calib-data", str(digits.CALIBRATION)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "no such file" in err and "--samples" in err

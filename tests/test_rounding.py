"""Hessian-aware rounding (GPTQ) and bias correction: weights rounded for the layer's output on
its calibration inputs, not for the weight itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import ocs_onnx
from models import builders, digits
from ocs_onnx import hessian, quant
from ocs_onnx.errors import UsageError

from .conftest import run_model


def _correlated_inputs(rng: np.random.Generator, rows: int, features: int) -> np.ndarray:
    mixing = rng.normal(size=(features, features)) * 0.4 + np.eye(features)
    return rng.normal(size=(rows, features)) @ mixing


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("per_channel", [True, False])
def test_hessian_rounding_has_a_lower_output_error_than_nearest_on_a_random_layer(bits, per_channel):
    rng = np.random.default_rng(bits)
    w, x = rng.normal(size=(24, 40)), _correlated_inputs(rng, 2000, 40)
    peak = np.abs(w).max(axis=1) if per_channel else np.abs(w).max()
    scale = peak / quant.symmetric_qmax(bits)
    nearest = quant.quantize_symmetric(w, scale[:, None] if per_channel else scale, bits)
    levels = hessian.hessian_levels(w, x.T @ x, scale, bits)
    assert np.abs(levels).max() <= quant.symmetric_qmax(bits)

    def error(q):
        s = scale[:, None] if per_channel else scale
        return np.linalg.norm((w - q * s) @ x.T)

    assert error(levels) < 0.8 * error(nearest)


def test_rounding_the_columns_with_the_most_input_energy_first_lowers_the_output_error_further():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(32, 64))
    x = _correlated_inputs(rng, 3000, 64) * np.exp(rng.normal(size=64))  # channels of unequal energy
    gram, scale = x.T @ x, np.abs(w).max(axis=1) / quant.symmetric_qmax(4)
    in_order = hessian.hessian_levels(w, gram, scale, 4, largest_first=False)
    largest_first = hessian.hessian_levels(w, gram, scale, 4)
    assert hessian.output_error(w, largest_first, scale, gram) < hessian.output_error(w, in_order, scale, gram)


def test_the_gram_matrix_streams_batch_by_batch_into_what_one_pass_over_all_rows_gives():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 7, 5))  # 12 samples of 7 rows of 5 features
    streamed = hessian.InputGram(hessian.InputLayout("x", "rows"), seed=0)
    for batch in np.split(x, 4):
        streamed.update(batch)
    rows = x.reshape(-1, 5)
    assert streamed.rows == len(rows)
    np.testing.assert_allclose(streamed.gram, rows.T @ rows, rtol=1e-5)  # a batch's products in float32
    np.testing.assert_allclose(streamed.mean, rows.mean(axis=0))


def test_conv_patches_hold_the_features_in_the_weights_own_order():
    # a patch times the weight's row, flattened as (channel, kernel row, kernel column), is the
    # Conv's output at that position: onnxruntime's Conv is the reference
    rng = np.random.default_rng(1)
    model = builders.conv_bn_residual_net(channels=4)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    layout = hessian.InputLayout(
        conv.input[0], "conv2d", kernel=weight.shape[2:], strides=tuple(attrs.get("strides", (1, 1))),
        pads=tuple(attrs.get("pads", (0, 0, 0, 0))), dilations=tuple(attrs.get("dilations", (1, 1))),
    )  # fmt: skip
    x = rng.normal(size=(2, weight.shape[1], 16, 16)).astype(np.float32)
    model.graph.output.append(onnx.helper.make_tensor_value_info(conv.output[0], onnx.TensorProto.FLOAT, None))
    feed = {model.graph.input[0].name: x}
    conv_out = dict(zip([o.name for o in model.graph.output], run_model(model, feed)))[conv.output[0]]
    patches = hessian.conv_patches(x.astype(np.float64), layout, np.random.default_rng(0), per_sample=10**6)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    bias = initializers[conv.input[2]] if len(conv.input) > 2 else 0.0
    expected = conv_out.transpose(0, 2, 3, 1).reshape(-1, weight.shape[0])  # samples, then positions in order
    np.testing.assert_allclose(patches @ weight.reshape(weight.shape[0], -1).T + bias, expected, rtol=1e-4, atol=1e-4)


def _output_error(quantized: onnx.ModelProto, model: onnx.ModelProto, feed: dict) -> float:
    return float(np.linalg.norm(run_model(quantized, feed)[0] - run_model(model, feed)[0]))


def _calibration(tmp_path, model: onnx.ModelProto, samples: int = 256):
    feed = builders.random_inputs(model, batch=samples, seed=3)
    path = tmp_path / "calib.npz"
    np.savez(path, **feed)
    return path, feed


def test_a_hessian_rounded_model_is_closer_to_float_on_its_calibration_data(tmp_path):
    model = builders.mlp_gemm(sizes=(32, 48, 48, 10))
    calib, feed = _calibration(tmp_path, model)
    options = dict(wbits=3, abits=None, ratio=0.0, calib_data=calib)
    nearest, _ = ocs_onnx.compile(model, rounding="nearest", **options)
    rounded, report = ocs_onnx.compile(model, rounding="hessian", **options)
    assert all(layer["rounding"].startswith("hessian") for layer in report["layers"])
    assert all(layer["output_error_vs_nearest"] < 1 for layer in report["layers"])
    assert _output_error(rounded, model, feed) < 0.8 * _output_error(nearest, model, feed)


def test_bias_correction_zeroes_the_mean_output_error_of_every_channel_on_the_calibration_data(tmp_path):
    model = builders.mlp_gemm(sizes=(32, 16))  # one Gemm: its output is the model's
    calib, feed = _calibration(tmp_path, model)
    options = dict(wbits=3, abits=None, ratio=0.0, calib_data=calib, calib_samples=256)
    float_out = run_model(model, feed)[0]
    for rounding in ("nearest", "hessian"):
        plain, _ = ocs_onnx.compile(model, rounding=rounding, **options)
        corrected, report = ocs_onnx.compile(model, rounding=rounding, bias_correction=True, **options)
        assert report["layers"][0]["bias_corrected"]
        shift = (run_model(corrected, feed)[0] - float_out).mean(axis=0)
        before = (run_model(plain, feed)[0] - float_out).mean(axis=0)
        assert np.abs(before).max() > 1e-3  # there was a shift to correct
        np.testing.assert_allclose(shift, 0.0, atol=1e-5)


def test_hessian_rounding_with_ocs_splits_keeps_the_splits_and_lowers_the_output_error(tmp_path):
    # split pieces multiply the same input: GPTQ feeds the first piece's rounding error to the
    # second, which then carries it, as the quantization-aware split does by construction
    model = builders.two_branch_conv_net(outlier_channel=2)
    calib, feed = _calibration(tmp_path, model, samples=64)
    options = dict(wbits=4, abits=None, ratio=0.1, min_split_gain_db=0.0, calib_data=calib)
    nearest, plain = ocs_onnx.compile(model, rounding="nearest", **options)
    rounded, report = ocs_onnx.compile(model, rounding="hessian", **options)
    split = [layer for layer in report["layers"] if layer["split"]]
    assert split and all(layer["rounding"].startswith("hessian") for layer in split)
    assert [layer["weight_shape_after"] for layer in report["layers"]] == [
        layer["weight_shape_after"] for layer in plain["layers"]
    ]
    assert _output_error(rounded, model, feed) < _output_error(nearest, model, feed)


def test_each_row_of_a_depthwise_layer_is_rounded_on_its_own_channels_inputs():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 9))
    inputs = [_correlated_inputs(rng, 500, 9) for _ in range(6)]  # row o reads channel o alone
    grams = np.stack([x.T @ x for x in inputs])
    scale = np.abs(w).max(axis=1) / quant.symmetric_qmax(3)
    nearest = quant.quantize_symmetric(w, scale[:, None], 3)
    levels = hessian.hessian_levels_per_row(w, grams, scale, 3)
    for o in range(6):  # each row is what GPTQ gives that row alone (in the columns' own order)
        alone = hessian.hessian_levels(w[o : o + 1], grams[o], scale[o : o + 1], 3, largest_first=False)
        np.testing.assert_array_equal(levels[o], alone[0])
    assert hessian.output_error(w, levels, scale, grams) < hessian.output_error(w, nearest, scale, grams)


def test_layers_hessian_rounding_cannot_reach_stay_nearest_and_say_why(tmp_path):
    model = builders.conv_bn_residual_net(channels=8)
    calib, _ = _calibration(tmp_path, model, samples=16)
    _, report = ocs_onnx.compile(model, wbits=4, rounding="hessian", calib_data=calib)
    roundings = {layer["name"]: layer["rounding"] for layer in report["layers"]}
    assert roundings["dw/conv"] == "hessian"  # depthwise: one Gram matrix per channel
    assert roundings["pw_grouped/conv"].startswith("nearest (") and "grouped" in roundings["pw_grouped/conv"]
    assert all(r.startswith("hessian") for name, r in roundings.items() if name != "pw_grouped/conv")


def test_auto_rounding_is_hessian_below_8_bits_with_calibration_data_and_nearest_otherwise():
    def rounding(**options):
        return ocs_onnx.CompileConfig(**options).rounding_method

    assert rounding(wbits=6, calib_data=digits.CALIBRATION) == "hessian"
    assert rounding(wbits=8, calib_data=digits.CALIBRATION) == "nearest"  # gains little at 8 bits
    assert rounding(wbits=4) == "nearest"  # random inputs say nothing of the layer's real inputs
    assert rounding(wbits=4, rounding="nearest", calib_data=digits.CALIBRATION) == "nearest"


def test_hessian_rounding_is_deterministic_and_an_unknown_rounding_is_refused():
    first, _ = ocs_onnx.compile(str(digits.MODEL), wbits=4, rounding="hessian", calib_data=digits.CALIBRATION)
    second, _ = ocs_onnx.compile(str(digits.MODEL), wbits=4, rounding="hessian", calib_data=digits.CALIBRATION)
    assert first.SerializeToString() == second.SerializeToString()
    with pytest.raises(UsageError, match="--rounding"):
        ocs_onnx.compile(str(digits.MODEL), rounding="adaround")


def test_the_paired_objective_is_the_output_error_against_the_float_layer_up_to_its_constant():
    rng = np.random.default_rng(3)
    x = _correlated_inputs(rng, 300, 6).reshape(3, 100, 6)  # float inputs: 3 samples of 100 rows
    x_quantized = x + rng.normal(scale=0.2, size=x.shape)  # what the quantized model feeds the layer
    pair = hessian.PairedGram(hessian.InputLayout("x", "rows"), "x_q", seed=0, per_sample=1000)
    for sample in range(3):
        pair.update(x[sample : sample + 1], x_quantized[sample : sample + 1])
    w = rng.normal(size=(4, 6))
    scale = np.abs(w).max(axis=1) / quant.symmetric_qmax(4)
    levels = quant.quantize_symmetric(w, scale[:, None], 4)
    rows, rows_quantized = x.reshape(-1, 6), x_quantized.reshape(-1, 6)
    error = np.sum((rows @ w.T - rows_quantized @ (levels * scale[:, None]).T) ** 2)
    constant = np.sum((rows @ w.T) ** 2)
    objective = hessian.float_output_objective(w, levels, scale, pair.gram, pair.cross)
    assert objective + constant == pytest.approx(error, rel=1e-4)  # the Gram products are float32


def test_conv_patches_of_the_float_and_quantized_inputs_are_taken_at_the_same_positions():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 9, 9))
    layout = hessian.InputLayout("x", "conv2d", kernel=(3, 3), pads=(1, 1, 1, 1))
    pair = hessian.PairedGram(layout, "x_q", seed=1, per_sample=20)  # 20 of 81 positions per sample
    pair.update(x, x)  # the same tensor twice: C must then be H
    np.testing.assert_allclose(pair.cross, pair.gram)
    assert pair.rows == 40


def _output_sqnr_db(model, reference, feed) -> float:
    quantized = run_model(model, feed)[0]
    return 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2))


def test_rounding_again_on_the_quantized_models_inputs_brings_its_output_closer_to_float():
    options = dict(wbits=4, ratio=0.0, rounding="hessian", calib_data=digits.CALIBRATION)
    float_inputs, float_report = ocs_onnx.compile(str(digits.MODEL), **options)  # the default
    refined, report = ocs_onnx.compile(str(digits.MODEL), rounding_inputs="quantized", **options)
    assert {layer["rounding"] for layer in float_report["layers"]} == {"hessian"}
    again = [layer["name"] for layer in report["layers"] if layer["rounding"] == "hessian, quantized inputs"]
    assert again and report["config"]["rounding_inputs"] == "quantized"
    with np.load(digits.CALIBRATION) as data:
        feed = {"image": data["image"][:256]}
    reference = run_model(onnx.load(str(digits.MODEL)), feed)[0]
    assert _output_sqnr_db(refined, reference, feed) > _output_sqnr_db(float_inputs, reference, feed)


def test_bias_correction_keeps_the_float_input_rounding_and_an_unknown_rounding_input_is_refused():
    _, report = ocs_onnx.compile(
        str(digits.MODEL), wbits=4, rounding="hessian", rounding_inputs="quantized", bias_correction=True,
        calib_data=digits.CALIBRATION,
    )  # fmt: skip
    assert {layer["rounding"] for layer in report["layers"]} == {"hessian"}
    with pytest.raises(UsageError, match="--rounding-inputs"):
        ocs_onnx.compile(str(digits.MODEL), rounding_inputs="both")

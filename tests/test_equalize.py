"""equalize-layers (``--equalize``): cross-layer equalization computes the same function, and
balances the weight ranges of the pairs it rescales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ocs_onnx import compile
from ocs_onnx.passes.equalize import equalization_scales

from models import digits

from .conftest import feed_for, max_relative_error, run_model


def test_equalized_models_compute_the_same_function(test_model):
    name, model = test_model
    feed = feed_for(name, model)
    expected = run_model(model, feed)
    equalized, report = compile(model, equalize=True, abits=None, stop_after="equalize-layers", verify=False)
    for want, got in zip(expected, run_model(equalized, feed)):
        assert max_relative_error(want, got) < 1e-5, name


def test_the_demo_has_two_pairs_and_they_end_balanced():
    model = onnx.load(str(digits.MODEL))
    equalized, report = compile(model, equalize=True, abits=None, stop_after="equalize-layers", verify=False)
    assert report["normalization"]["pairs_equalized"] == 2
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in equalized.graph.initializer}
    nodes = {n.name: n for n in equalized.graph.node}
    # conv1 -> relu -> conv2: row c of conv1 and column c of conv2 now have the same range
    rows = np.abs(weights[nodes["conv1"].input[1]]).reshape(32, -1).max(axis=1)
    columns = np.abs(np.moveaxis(weights[nodes["conv2"].input[1]], 1, 0)).reshape(32, -1).max(axis=1)
    np.testing.assert_allclose(rows, columns, rtol=2e-3)


def test_equalization_is_off_by_default_and_changes_nothing_then():
    plain, report = compile(str(digits.MODEL), abits=None)
    off, _ = compile(str(digits.MODEL), abits=None, equalize=False)
    assert plain.SerializeToString() == off.SerializeToString()
    assert "pairs_equalized" not in report["normalization"]


def test_scales_balance_the_two_ranges_and_leave_dead_channels_alone():
    scales = equalization_scales(np.array([4.0, 1.0, 0.0, 2.0]), np.array([1.0, 4.0, 3.0, 0.0]))
    np.testing.assert_allclose(scales, [2.0, 0.5, 1.0, 1.0])
    assert 4.0 / scales[0] == pytest.approx(1.0 * scales[0])


def _two_gemms_with_a_large_row() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 8)).astype(np.float32)
    w1[3] *= 20  # one output channel of the first layer 20x the others
    w2 = rng.normal(size=(4, 16)).astype(np.float32)
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="fc1", transB=1),
         h.make_node("Relu", ["a"], ["r"], name="relu"),
         h.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)],
        "two_gemms",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
         onnx.numpy_helper.from_array(w2, "w2"), onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b2")],
    )  # fmt: skip
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_a_pair_with_an_outlier_row_gets_a_finer_per_tensor_grid():
    model = _two_gemms_with_a_large_row()
    _, plain = compile(model, abits=None, granularity="tensor", ratio=0.0, wbits=6)
    _, equalized = compile(model, abits=None, granularity="tensor", ratio=0.0, wbits=6, equalize=True)
    assert equalized["normalization"]["pairs_equalized"] == 1
    before = {layer["name"]: layer["sqnr_db"]["with_ocs"] for layer in plain["layers"]}
    after = {layer["name"]: layer["sqnr_db"]["with_ocs"] for layer in equalized["layers"]}
    assert after["fc1"] > before["fc1"] + 3  # its large row no longer sets the grid alone (26.2 -> 32.1 dB)


def test_a_conv_feeding_a_matmul_is_not_a_pair():
    # the MatMul contracts the Conv output's last axis (width), not its channels, even where
    # their sizes agree
    rng = np.random.default_rng(0)
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Conv", ["x", "w1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
         h.make_node("Relu", ["a"], ["r"], name="relu"),
         h.make_node("MatMul", ["r", "w2"], ["y"], name="matmul")],
        "conv_matmul",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 4, 2])],
        [onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
         onnx.numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "w2")],
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    _, report = compile(model, equalize=True, abits=None, stop_after="equalize-layers", verify=False)
    assert report["normalization"]["pairs_equalized"] == 0

"""What the compiler promises, checked end to end on real onnxruntime sessions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import ocs_onnx
from models import builders, digits
from ocs_onnx import quant
from ocs_onnx.passes.weight_ocs import output_gain_db

from .conftest import feed_for, max_relative_error, run_model


# --------------------------------------------------------------------------------------------
# OCS without quantization computes the same function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["qa", "naive"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_ocs_rewrite_without_quantization_computes_the_same_function(test_model, split, granularity):
    name, model = test_model
    # Stop after the split offsets are in place, before any value is quantized; split every
    # layer (no guard) so that every rewrite is exercised.
    rewritten, report = ocs_onnx.compile(
        model,
        abits=None,
        wbits=4,
        ratio=0.2,
        split=split,
        granularity=granularity,
        ocs_guard=False,
        stop_after="qa-split",
    )
    assert report["totals"]["channels_split"] > 0
    assert any(n.op_type == "Concat" and n.name.endswith("_ocs_concat") for n in rewritten.graph.node)
    feed = feed_for(name, model)
    for expected, actual in zip(run_model(model, feed), run_model(rewritten, feed)):
        assert expected.shape == actual.shape
        assert max_relative_error(expected, actual) < 1e-5


def test_a_copy_can_be_split_again_and_the_function_is_kept():
    model = builders.mlp_gemm(sizes=(4, 8, 3))
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=1.0, ocs_guard=False, stop_after="qa-split")
    splits = {layer["name"]: layer["split_channels"] for layer in report["layers"]}
    assert any(len(set(c)) < len(c) for c in splits.values())  # some original channel split twice
    feed = builders.random_inputs(model, batch=5)
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-5


def test_layers_reading_the_same_tensor_with_the_same_splits_share_one_widened_input():
    # q/k/v projections read the same tensor; with identical weights they pick identical channels
    model = builders.transformer_block()
    weights = {t.name: t for t in model.graph.initializer}
    shared = onnx.numpy_helper.to_array(weights["attn.q_proj.weight"])
    for name in ("attn.k_proj.weight", "attn.v_proj.weight"):
        weights[name].CopyFrom(onnx.numpy_helper.from_array(shared, name))
    rewritten, _ = ocs_onnx.compile(model, abits=None, ratio=0.05, stop_after="weight-ocs")
    concats = [n for n in rewritten.graph.node if n.op_type == "Concat" and n.name.endswith("_ocs_concat")]
    of_x = [n for n in concats if n.input[0] == "x"]
    assert len(of_x) == 1
    inputs = {n.name: n.input[0] for n in rewritten.graph.node}
    assert (
        inputs["attn.q_proj/matmul"]
        == inputs["attn.k_proj/matmul"]
        == inputs["attn.v_proj/matmul"]
        == of_x[0].output[0]
    )


# --------------------------------------------------------------------------------------------
# OCS improves weight quantization error, at a bounded size overhead
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [6, 5, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ocs_improves_weight_sqnr_over_no_splitting(test_model, bits, granularity):
    name, model = test_model
    _, with_ocs = ocs_onnx.compile(model, wbits=bits, abits=None, ratio=0.02, granularity=granularity, verify=False)
    _, without = ocs_onnx.compile(model, wbits=bits, abits=None, ratio=0.0, granularity=granularity, verify=False)
    # ratio 0: the report's two figures agree; the plain figures match the ratio-0 compile
    for plain, layer in zip(without["layers"], with_ocs["layers"]):
        assert plain["sqnr_db"]["with_ocs"] == plain["sqnr_db"]["without_ocs"] == layer["sqnr_db"]["without_ocs"]
    split_layers = [layer for layer in with_ocs["layers"] if layer["split"]]
    assert split_layers
    gains = [layer["sqnr_db"]["with_ocs"] - layer["sqnr_db"]["without_ocs"] for layer in split_layers]
    # Most layers gain, and the model as a whole gains; a single layer whose two largest
    # channels are nearly equal can lose a fraction of a dB to a new rounding pattern.
    assert sum(g > 0 for g in gains) >= len(gains) / 2
    assert min(gains) > -0.5
    total = with_ocs["totals"]["weight_sqnr_db"]
    assert total["with_ocs"] > total["without_ocs"]


@pytest.mark.parametrize("ratio", [0.01, 0.02, 0.05])
def test_weight_overhead_stays_within_ratio_plus_one_percent_with_copies_made_at_run_time(ratio):
    # ceil(r * C) adds at most one channel beyond r * C: within r + 1 % once layers have >= 100
    # inputs. (Copies computed by a producer add its duplicated rows too: up to about twice that.)
    for model in (
        builders.conv_bn_residual_net(channels=128),
        builders.mlp_gemm(sizes=(128, 256, 256, 10)),
        builders.transformer_block(d_model=128, d_ff=256),
    ):
        _, report = ocs_onnx.compile(
            model, wbits=6, abits=None, ratio=ratio, verify=False, fold_ocs_copies=False, min_split_gain_db=0.0
        )
        assert 0 < report["totals"]["weight_overhead"] <= ratio + 0.01


def test_splits_that_gain_less_than_the_minimum_are_dropped_and_auto_keeps_them_below_6_bits():
    model = builders.conv_bn_residual_net(channels=32)

    def gains(**options) -> dict[str, float | None]:
        _, report = ocs_onnx.compile(model, abits=None, ratio=0.05, verify=False, **options)
        return {layer["name"]: layer for layer in report["layers"]}

    every = gains(wbits=6, min_split_gain_db=0.0)
    split = {name: e["sqnr_db"]["with_ocs"] - e["sqnr_db"]["without_ocs"] for name, e in every.items() if e["split"]}
    threshold = sorted(split.values())[len(split) // 2]  # keeps about half
    kept = gains(wbits=6, min_split_gain_db=threshold)
    for name, gain in split.items():
        assert bool(kept[name]["split"]) == (gain >= threshold - 1e-9), name
        if not kept[name]["split"]:
            assert "less than --min-split-gain" in kept[name]["not_split_reason"]


def test_a_splits_gain_is_the_layers_output_sqnr_with_its_inputs_quantization_noise_counted():
    # Halving the weight error is 3 dB alone; behind an input whose own noise equals the weight
    # error before splitting, the output noise goes from 2 to 1.5 units: 1.25 dB.
    assert output_gain_db(1e-3, 0.5e-3, 1.0, input_sqnr=None) == pytest.approx(3.0103, abs=1e-4)
    assert output_gain_db(1e-3, 0.5e-3, 1.0, input_sqnr=30.0) == pytest.approx(1.2494, abs=1e-4)
    assert output_gain_db(2e-3, 1e-3, 2.0, input_sqnr=30.0) == pytest.approx(1.2494, abs=1e-4)  # relative errors


def test_splits_behind_a_noisy_8_bit_input_are_dropped_where_the_same_weights_alone_would_split():
    model = builders.transformer_block()

    def layers(**options) -> dict[str, dict]:
        _, report = ocs_onnx.compile(model, ratio=0.02, verify=False, **options)
        return {layer["name"]: layer for layer in report["layers"]}

    weight_only, w8a8 = layers(abits=None, wbits=7), layers(abits=8, wbits=8)  # both a 7-bit weight grid
    dropped = [name for name in weight_only if weight_only[name]["split"] and not w8a8[name]["split"]]
    assert dropped, "at 7 bits some split gains more than 1 dB of weight SQNR but not of output SQNR"
    for name in dropped:
        reason = w8a8[name]["not_split_reason"]
        assert "output SQNR" in reason and "its input's quantization SQNR" in reason, reason
        assert weight_only[name]["sqnr_db"]["with_ocs"] - weight_only[name]["sqnr_db"]["without_ocs"] >= 1.0


def test_the_automatic_minimum_split_gain_is_1_db_at_6_bits_and_more_and_0_below():
    def split_layers(**options) -> set[str]:
        _, report = ocs_onnx.compile(str(digits.MODEL), abits=None, ratio=0.02, verify=False, **options)
        return {layer["name"] for layer in report["layers"] if layer["split"]}

    for bits in (8, 6):
        assert split_layers(wbits=bits) == split_layers(wbits=bits, min_split_gain_db=1.0)
        assert split_layers(wbits=bits) < split_layers(wbits=bits, min_split_gain_db=0.0)  # the demo has small gains
    assert split_layers(wbits=5) == split_layers(wbits=5, min_split_gain_db=0.0)


def test_copies_computed_by_the_producer_count_its_extra_rows_in_the_overhead():
    model = builders.mlp_gemm(sizes=(128, 256, 256, 10))
    _, report = ocs_onnx.compile(model, wbits=6, abits=None, ratio=0.02, verify=False)
    layers = report["layers"]
    assert report["totals"]["splits_folded"] >= 1
    added = sum(int(np.prod(layer["weight_shape_after"]) - np.prod(layer["weight_shape"])) for layer in layers)
    assert any(layer["output_channels_computed_twice"] for layer in layers)  # a producer's extra rows
    assert report["totals"]["quantized_weights_after"] - report["totals"]["quantized_weights_before"] == added


# --------------------------------------------------------------------------------------------
# The quantized model runs on integer kernels and keeps the task accuracy
# --------------------------------------------------------------------------------------------


def test_quantized_layers_run_as_integer_kernels_in_onnxruntime(test_model):
    name, model = test_model
    calib = {"calib_data": digits.CALIBRATION} if name == "digits_cnn" else {}
    quantized, report = ocs_onnx.compile(model, wbits=6, ratio=0.02, **calib)
    info = report["onnxruntime"]
    assert info["quantized_layers"] == len(report["layers"]) > 0
    assert info["integer_kernels"] >= 0.9 * info["quantized_layers"]
    outputs = run_model(quantized, feed_for(name, model))
    assert all(np.isfinite(o).all() for o in outputs)


def test_uint8_activations_fuse_every_layer_of_a_transformer():
    _, report = ocs_onnx.compile(builders.transformer_block(), activation_type="uint8")
    assert report["onnxruntime"]["integer_kernels"] == report["onnxruntime"]["quantized_layers"] == 6


def test_int8_activations_fuse_the_layers_whose_input_nothing_else_reads():
    # onnxruntime runs an int8-activation MatMul as an integer kernel only where the quantized
    # tensor has one reader (q/k/v share theirs, and fc1's LayerNorm output feeds the residual).
    quantized, report = ocs_onnx.compile(builders.transformer_block(), activation_type="int8", ratio=0.0)
    producers = {out: node for node in quantized.graph.node for out in node.output}
    readers = Counter(name for node in quantized.graph.node for name in node.input)
    alone = [
        node.name
        for node in quantized.graph.node
        if node.op_type == "MatMul" and producers[node.input[0]].op_type == "DequantizeLinear"
        and readers[node.input[0]] == 1
    ]
    assert sorted(alone) == ["attn.out_proj/matmul", "ffn.fc2/matmul"]
    assert report["onnxruntime"]["integer_kernels"] == len(alone)


def test_demo_model_keeps_accuracy_within_one_point_at_w8a8():
    float_accuracy = digits.accuracy(digits.MODEL)
    quantized, report = ocs_onnx.compile(str(digits.MODEL), wbits=8, abits=8, calib_data=digits.CALIBRATION)
    assert report["calibration"]["source"] == str(digits.CALIBRATION)
    assert digits.accuracy(quantized) >= float_accuracy - 1.0


def test_weight_only_quantization_needs_no_calibration():
    quantized, report = ocs_onnx.compile(str(digits.MODEL), wbits=6, abits=None)
    assert report["calibration"]["samples"] == 0 and not report["activations"]
    assert not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    assert digits.accuracy(quantized) >= digits.accuracy(digits.MODEL) - 1.0


def test_without_calibration_data_synthetic_inputs_are_used_and_reported():
    _, report = ocs_onnx.compile(builders.token_embedding_net(vocab=50))
    assert report["calibration"]["source"] == "synthetic"
    assert any("synthetic" in w for w in report["warnings"])


def test_kernel_disagreement_is_blamed_on_overflow_only_where_overflow_is_possible():
    from ocs_onnx.passes.verify import kernel_disagreement_hint

    assert "overflow" in kernel_disagreement_hint(weight_bits=8, abits=8)
    assert "ruled out" not in kernel_disagreement_hint(weight_bits=8, abits=8)
    for weight_bits, abits in ((7, 8), (6, 8), (8, 6)):
        assert "ruled out" in kernel_disagreement_hint(weight_bits=weight_bits, abits=abits)
    # the default W8A8 grid: scales raised per row where the calibration data could overflow
    bounded = kernel_disagreement_hint(weight_bits=8, abits=8, pair_sums_bounded=True)
    assert "likely 16-bit overflow" not in bounded and "calibration data" in bounded


def test_weights_are_int8_within_the_bit_width_with_zero_points_zero():
    quantized, _ = ocs_onnx.compile(builders.mlp_gemm(), wbits=4, abits=None)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    int8 = [v for k, v in inits.items() if k.endswith("_int8")]
    assert int8 and all(v.dtype == np.int8 and np.abs(v).max() <= 7 for v in int8)
    assert all(np.all(v == 0) for k, v in inits.items() if k.endswith("_zero_point"))


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


def test_batchnorm_is_folded_into_conv_and_constants_become_initializers():
    _, report = ocs_onnx.compile(builders.conv_bn_residual_net(), abits=None)
    assert report["normalization"]["batchnorms_folded"] == 6
    model = builders.constant_weights_net()
    quantized, report = ocs_onnx.compile(model, abits=None)
    assert report["normalization"]["constant_nodes_folded"] == 4
    assert report["normalization"]["opset_in"] == 11 and report["normalization"]["opset_out"] == 13
    assert len(report["layers"]) == 2
    assert not any(n.op_type == "Constant" for n in quantized.graph.node)


def _conv_then(ops: list[tuple[str, np.ndarray, bool]], bias: bool) -> onnx.ModelProto:
    """x -> Conv -> each (op, constant, constant first) in turn -> Relu -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "W")]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "B"))
        conv_inputs.append("B")
    nodes = [helper.make_node("Conv", conv_inputs, ["t0"], pads=[1, 1, 1, 1])]
    for i, (op, value, first) in enumerate(ops):
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"c{i}"))
        operands = [f"c{i}", f"t{i}"] if first else [f"t{i}", f"c{i}"]
        nodes.append(helper.make_node(op, operands, [f"t{i + 1}"]))
    nodes.append(helper.make_node("Relu", [f"t{len(ops)}"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


PER_CHANNEL = np.linspace(-1.5, 2.0, 6)


@pytest.mark.parametrize(
    "ops, bias",
    [
        ([("Add", PER_CHANNEL.reshape(1, 6, 1, 1), False)], False),  # paddle2onnx's bias Add
        ([("Add", PER_CHANNEL.reshape(6, 1, 1), True), ("Mul", np.array([0.7]), False), ("Add", np.array(0.2), False)], True),
        ([("Mul", PER_CHANNEL.reshape(1, 6, 1, 1), True), ("Sub", np.array([0.3]), False)], True),
    ],
    ids=["bias add", "bias, then a scalar scale and shift", "per-channel scale, then a shift"],
)
def test_constant_affine_ops_after_a_conv_fold_into_it_and_compute_the_same_function(ops, bias):
    model = _conv_then(ops, bias)
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.0, stop_after="fold-affine")
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Relu"]
    assert report["normalization"]["affine_ops_folded"] == len(ops)
    feed = {"x": np.random.default_rng(4).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-6


def _affine_then_conv(kernel: int, group: int, scale, shift) -> onnx.ModelProto:
    """x -> Relu -> * scale -> + shift -> Conv (kernel, group; padded when kernel > 1) -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 8 // group, kernel, kernel)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "B"),
        numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
        numpy_helper.from_array(np.asarray(shift, np.float32), "shift"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["scaled"]),
        helper.make_node("Add", ["shift", "scaled"], ["shifted"]),
        helper.make_node("Conv", ["shifted", "W", "B"], ["y"], pads=[kernel // 2] * 4, group=group),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "kernel, group, ops",
    [
        (1, 1, ["Relu", "Conv"]),  # no padding: scale and shift both fold
        (3, 1, ["Relu", "Add", "Conv"]),  # padded: the shift stays (as b / c), the scale folds
        (3, 8, ["Relu", "Add", "Conv"]),  # a padded depthwise Conv
    ],
    ids=["1x1 Conv", "padded 3x3 Conv", "padded depthwise Conv"],
)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per channel"])
def test_a_scale_and_shift_before_a_conv_fold_into_it_where_exact(kernel, group, ops, per_channel):
    scale = np.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1) if per_channel else np.array([0.8])
    shift = np.linspace(-0.3, 0.4, 8).reshape(8, 1, 1) if per_channel else np.array(0.25)
    model = _affine_then_conv(kernel, group, scale, shift)
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.0, stop_after="fold-affine")
    assert [n.op_type for n in rewritten.graph.node] == ops
    assert report["normalization"]["affine_ops_folded"] == 4 - len(ops)
    feed = {"x": np.random.default_rng(9).normal(size=(2, 8, 6, 6)).astype(np.float32)}
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-5


@pytest.mark.parametrize(
    "ops",
    [
        [("Add", np.ones((1, 6, 8, 1)), False)],  # varies along a spatial axis
        [("Add", np.ones((2, 6, 1, 1)), False)],  # varies along the batch axis
        [("Sub", np.array([0.3]), True)],  # c - conv(x)
        [("Div", np.array([2.0]), False)],
    ],
    ids=["spatial constant", "batch constant", "constant minus conv", "div"],
)
def test_ops_that_are_not_a_per_channel_affine_map_stay(ops):
    model = _conv_then(ops, bias=True)
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.0, stop_after="fold-affine")
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", ops[0][0], "Relu"]
    assert report["normalization"]["affine_ops_folded"] == 0


def _spelled_out_hardswish(opset: int, divisor: float = 6.0) -> onnx.ModelProto:
    """x -> Conv -> h * Clip(h + 3, 0, 6) / divisor -> y, as paddle2onnx writes HardSwish."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    consts = {"W": rng.normal(size=(6, 3, 3, 3)), "three": 3.0, "zero": 0.0, "six": 6.0, "divisor": divisor}
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in consts.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["h", "three"], ["shifted"]),
        helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
        helper.make_node("Mul", ["h", "clipped"], ["product"]),
        helper.make_node("Div", ["product", "divisor"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, ops", [(14, ["Conv", "HardSwish"]), (13, ["Conv", "HardSigmoid", "Mul"])])
def test_a_spelled_out_hardswish_becomes_one_op_and_computes_the_same_function(opset, ops):
    model = _spelled_out_hardswish(opset)
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.0, stop_after="fuse-hardswish")
    assert [n.op_type for n in rewritten.graph.node] == ops
    assert report["normalization"]["hardswish_fused"] == 1
    feed = {"x": np.random.default_rng(6).normal(size=(2, 3, 8, 8)).astype(np.float32) * 3}
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-6


def test_a_near_hardswish_with_another_divisor_is_left_alone():
    rewritten, report = ocs_onnx.compile(_spelled_out_hardswish(14, divisor=5.0), abits=None, stop_after="fuse-hardswish")
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Add", "Clip", "Mul", "Div"]
    assert report["normalization"]["hardswish_fused"] == 0


def test_weights_held_in_constant_nodes_are_counted_as_parameters():
    model = builders.constant_weights_net(channels=4, out_features=10)
    _, report = ocs_onnx.compile(model, abits=None)
    conv, fc = 4 * 3 * 3 * 3 + 4, 4 * 8 * 8 * 10 + 10
    assert report["totals"]["parameters_before"] == conv + fc
    assert report["totals"]["parameters_after"] >= conv + fc


def test_a_reshape_with_a_target_shape_computed_at_run_time_still_feeds_an_integer_gemm():
    # paddle2onnx flattens a classifier's pooled features with a run-time target shape; ONNX
    # shape inference cannot follow it, but the target's length gives the rank the MatMul
    # needs to become a Gemm (an integer kernel) instead of staying a float MatMul.
    model = builders.runtime_reshape_head_net()
    quantized, report = ocs_onnx.compile(model)
    assert report["normalization"]["matmul_add_to_gemm"] == 1
    assert [layer["op"] for layer in report["layers"]] == ["Conv", "Gemm"]
    assert report["onnxruntime"]["integer_kernels"] == report["onnxruntime"]["quantized_layers"] == 2
    feed = builders.random_inputs(model, batch=5)
    (expected,), (actual,) = run_model(model, feed), run_model(quantized, feed)
    assert actual.shape == (5, 2)
    assert np.abs(expected - actual).max() < 0.05


def test_dynamic_batch_and_sequence_dimensions_stay_dynamic():
    quantized, _ = ocs_onnx.compile(builders.transformer_block())
    dims = [d.dim_param for d in quantized.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "seq"]
    for batch, seq in ((1, 3), (4, 17)):
        (y,) = run_model(quantized, builders.random_inputs(quantized, batch=batch, seq=seq))
        assert y.shape == (batch, seq, 32)


def test_depthwise_and_grouped_convs_are_quantized_but_not_split():
    _, report = ocs_onnx.compile(builders.conv_bn_residual_net(), abits=None, ratio=0.5)
    grouped = {layer["name"]: layer for layer in report["layers"] if layer["not_split_reason"]}
    assert set(grouped) == {"dw/conv", "pw_grouped/conv"}
    assert "depthwise" in grouped["dw/conv"]["not_split_reason"]
    assert all(layer["channels_split"] == 0 for layer in grouped.values())


def test_excluded_nodes_stay_float():
    _, report = ocs_onnx.compile(builders.transformer_block(), exclude=("ffn.*", "Gemm"))
    names = {layer["name"] for layer in report["layers"]}
    assert names == {"attn.q_proj/matmul", "attn.k_proj/matmul", "attn.v_proj/matmul", "attn.out_proj/matmul"}
    assert report["kept_float"]["ffn.fc1/matmul"] == "excluded by --exclude ffn.*"


def test_a_conv_transpose_stays_float_and_the_report_says_so():
    # A detector's upsampling head (PP-OCR det ends in two of them)
    rng = np.random.default_rng(0)
    conv_w = onnx.numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "conv.weight")
    up_w = onnx.numpy_helper.from_array(rng.normal(size=(8, 4, 2, 2)).astype(np.float32), "up.weight")
    nodes = [
        onnx.helper.make_node("Conv", ["x", "conv.weight"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("ConvTranspose", ["r", "up.weight"], ["y"], name="up", strides=[2, 2]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "upsampling_head",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 16, 16])],
        [conv_w, up_w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    quantized, report = ocs_onnx.compile(model)
    assert [layer["name"] for layer in report["layers"]] == ["conv"]
    assert "ConvTranspose" in report["kept_float"]["up"]
    feed = builders.random_inputs(model, batch=2)
    assert run_model(quantized, feed)[0].shape == (2, 4, 16, 16)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_compiling_twice_gives_identical_bytes():
    first, _ = ocs_onnx.compile(str(digits.MODEL), wbits=5, ratio=0.05, calib_data=digits.CALIBRATION)
    second, _ = ocs_onnx.compile(str(digits.MODEL), wbits=5, ratio=0.05, calib_data=digits.CALIBRATION)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)


def test_the_input_model_object_is_not_modified():
    model = builders.conv_bn_residual_net()
    before = model.SerializeToString()
    ocs_onnx.compile(model, wbits=4)
    assert model.SerializeToString() == before


def test_report_sqnr_matches_an_independent_computation():
    model = builders.mlp_gemm()
    _, report = ocs_onnx.compile(model, wbits=5, abits=None, ratio=0.0, granularity="tensor")
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc1.weight"))
    scale = np.abs(w).max() / 15
    expected = quant.sqnr_db(w, np.clip(np.floor(w / scale + 0.5), -15, 15) * scale)
    layer = next(layer for layer in report["layers"] if layer["name"] == "fc1/gemm")
    assert layer["sqnr_db"]["without_ocs"] == pytest.approx(expected, abs=1e-3)


def _with_weight(model: onnx.ModelProto, name: str, values) -> onnx.ModelProto:
    weights = {t.name: t for t in model.graph.initializer}
    array = onnx.numpy_helper.to_array(weights[name]).copy()
    array[...] = values(array)
    weights[name].CopyFrom(onnx.numpy_helper.from_array(array, name))
    return model


def test_a_weight_with_nan_keeps_that_layer_float_and_compiles_the_rest():
    def poison(w):
        w[0, 0] = np.nan
        return w

    model = _with_weight(builders.mlp_gemm(), "fc1.weight", poison)
    _, report = ocs_onnx.compile(model, abits=None)
    assert "NaN" in report["kept_float"]["fc1/gemm"]
    assert [layer["name"] for layer in report["layers"]] == ["fc0/gemm", "fc2/gemm"]
    assert any("fc1/gemm" in w for w in report["warnings"])


def test_an_all_zero_weight_quantizes_to_zero_without_dividing_by_zero():
    model = _with_weight(builders.mlp_gemm(), "fc1.weight", lambda w: 0.0)
    quantized, report = ocs_onnx.compile(model, wbits=4, ratio=0.05)
    layer = next(layer for layer in report["layers"] if layer["name"] == "fc1/gemm")
    assert layer["sqnr_db"] == {"without_ocs": None, "with_ocs": None}
    (y,) = run_model(quantized, builders.random_inputs(model))
    assert np.isfinite(y).all()


def test_activations_are_clipped_at_the_99_99th_percentile_by_default():
    _, default = ocs_onnx.compile(str(digits.MODEL), calib_data=digits.CALIBRATION)
    _, unclipped = ocs_onnx.compile(str(digits.MODEL), calib_data=digits.CALIBRATION, aclip="none")
    name = "relu2_out"
    clip = default["activations"][name]["clip"]
    assert clip["method"] == "percentile" and default["config"]["percentile"] == 99.99
    assert clip["range"][1] < unclipped["activations"][name]["clip"]["range"][1]


def test_activation_clip_narrows_ranges_from_the_calibration_histogram():
    _, plain = ocs_onnx.compile(str(digits.MODEL), calib_data=digits.CALIBRATION, aclip="none")
    _, clipped = ocs_onnx.compile(str(digits.MODEL), calib_data=digits.CALIBRATION, aclip="percentile", percentile=99.0)
    name = "relu2_out"  # a Relu output read by two layers
    full, narrowed = plain["activations"][name], clipped["activations"][name]
    assert full["clip"]["range"] == full["range"]
    assert narrowed["range"] == full["range"] and narrowed["clip"]["method"] == "percentile"
    assert 0 < narrowed["clip"]["range"][1] < full["range"][1]
    assert narrowed["scale"] < full["scale"]


@pytest.mark.parametrize("method", ["mse", "aciq", "kl", "percentile"])
def test_every_clip_method_compiles_the_demo_model(method):
    quantized, report = ocs_onnx.compile(
        str(digits.MODEL), wbits=5, wclip=method, aclip=method, calib_data=digits.CALIBRATION, granularity="tensor"
    )
    assert report["layers"][0]["clip"]["method"] == method
    assert all(layer["clip"]["threshold"] <= layer["clip"]["max_abs"] for layer in report["layers"])
    assert report["onnxruntime"]["integer_kernels"] == len(report["layers"])
    assert digits.accuracy(quantized) > 90.0


CLIP_CASES = [(m, g) for m in ("mse", "aciq", "percentile") for g in ("tensor", "channel")] + [("kl", "tensor")]


@pytest.mark.parametrize("method, granularity", CLIP_CASES)
def test_ocs_plus_clip_never_has_a_larger_weight_error_than_clip_alone(test_model, method, granularity):
    name, model = test_model
    for bits in (4, 6):
        _, report = ocs_onnx.compile(
            model, wbits=bits, abits=None, ratio=0.02, granularity=granularity, wclip=method, verify=False
        )
        for layer in report["layers"]:
            without, with_ocs = layer["sqnr_db"]["without_ocs"], layer["sqnr_db"]["with_ocs"]
            assert with_ocs >= without, (layer["name"], bits)
            if layer["split"]:  # a split is kept only where it lowered the error
                assert with_ocs > without, (layer["name"], bits)


# --------------------------------------------------------------------------------------------
# Activation OCS
# --------------------------------------------------------------------------------------------

ACTIVATION_OCS_MODELS = {
    "two_branch_conv": lambda: builders.two_branch_conv_net(outlier_channel=3),  # Conv, 2 consumers
    "transformer_block": builders.transformer_block,  # MatMul; q/k/v read one tensor
    "mlp_gemm": builders.mlp_gemm,  # Gemm, both weight layouts
    "digits_cnn": lambda: onnx.load(str(digits.MODEL)),
}


def _offsets(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_act_ocs_offset")
    }


@pytest.mark.parametrize("name", sorted(ACTIVATION_OCS_MODELS))
def test_activation_ocs_without_quantization_computes_the_same_function(name):
    model = ACTIVATION_OCS_MODELS[name]()
    options = dict(act_ratio=0.25, ratio=0.1, ocs_guard=False, calib_samples=32)
    # Quantization off: stop before any weight or activation is quantized.
    rewritten, report = ocs_onnx.compile(model, stop_after="qa-split", **options)
    assert report["totals"]["activations_split"] > 0
    feed = feed_for(name, model)
    for expected, actual in zip(run_model(model, feed), run_model(rewritten, feed)):
        assert max_relative_error(expected, actual) < 1e-5
    # The quantization-aware offsets the full compile chooses (+-1/4 of a step) cancel too.
    quantized, _ = ocs_onnx.compile(model, **options)
    final_offsets = _offsets(quantized)
    assert final_offsets and all(np.abs(v).max() > 0 for v in final_offsets.values())
    for tensor in rewritten.graph.initializer:
        if tensor.name in final_offsets:
            tensor.CopyFrom(onnx.numpy_helper.from_array(final_offsets[tensor.name], tensor.name))
    for expected, actual in zip(run_model(model, feed), run_model(rewritten, feed)):
        assert max_relative_error(expected, actual) < 1e-5


def test_activation_ocs_widens_every_layer_reading_the_split_activation():
    model = builders.two_branch_conv_net(outlier_channel=3)
    _, report = ocs_onnx.compile(model, act_ratio=0.1, ratio=0.0)
    splits = {a["split"]["of"]: a["split"]["channels"] for a in report["activations"].values() if a["split"]}
    assert splits["stem/relu_out"] == [3]  # the outlier channel, ceil(0.1 * 8) = 1 split
    layers = {layer["name"]: layer for layer in report["layers"]}
    for name in ("branch_a/conv", "branch_b/conv"):
        assert layers[name]["activation_copies"] == [3]
        assert layers[name]["weight_shape"][1] == 8 and layers[name]["weight_shape_after"][1] == 9


def test_activation_ocs_raises_the_split_activations_sqnr():
    model = builders.two_branch_conv_net(outlier_channel=3)
    for bits in (4, 6):  # unclipped, to see the split alone
        _, plain = ocs_onnx.compile(model, abits=bits, ratio=0.0, aclip="none")
        _, split = ocs_onnx.compile(model, abits=bits, ratio=0.0, act_ratio=0.1, aclip="none")
        (after,) = [a for a in split["activations"].values() if a["split"] and a["split"]["of"] == "stem/relu_out"]
        before = plain["activations"]["stem/relu_out"]
        assert after["range"][1] == pytest.approx(before["range"][1] / 2, rel=0.2)  # the outlier halved
        assert after["sqnr_db"] > before["sqnr_db"] + 2.0


def test_a_tensor_that_other_ops_also_read_is_not_split():
    # conv_bn_residual's block input feeds a Conv and the skip Add: splitting it would leave the
    # Add reading the whole tensor, quantized before the split.
    _, report = ocs_onnx.compile(builders.conv_bn_residual_net(), act_ratio=1.0, ratio=0.0)
    split_sources = {a["split"]["of"] for a in report["activations"].values() if a["split"]}
    assert "stem/relu_out" not in split_sources and split_sources


def test_sub_8_bit_activations_are_clipped_to_their_grid():
    model = builders.mlp_gemm()
    quantized, report = ocs_onnx.compile(model, abits=4)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    quantizers = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for q in quantizers:
        clip = producers[q.input[0]]
        assert clip.op_type == "Clip"
        scale, zero_point = float(values[q.input[1]]), int(values[q.input[2]])
        assert float(values[clip.input[2]]) == pytest.approx(scale * (15 - zero_point), rel=1e-6)
    # At 8 bits the type's own saturation is the grid's: no Clip.
    quantized8, _ = ocs_onnx.compile(model, abits=8)
    assert not any(n.op_type == "Clip" for n in quantized8.graph.node)


def test_kl_on_relu_activations_keeps_the_demo_output():
    # A Relu output's spike of zeros once drove KL to clip the demo's activations to a third of
    # their range (logit SQNR 14 dB at A8); with TensorRT's treatment of that bin it stays close
    # to no clipping (34 dB).
    _, report = ocs_onnx.compile(str(digits.MODEL), calib_data=digits.CALIBRATION, aclip="kl", ratio=0.0)
    assert report["onnxruntime"]["output_sqnr_db"]["logits"] > 28.0


def test_a_conv_with_an_impossible_group_count_is_an_invalid_model_not_an_internal_error(tmp_path, capsys):
    from ocs_onnx.cli import main

    model = _affine_then_conv(1, 1, np.array([0.8]), np.array(0.25))
    next(a for a in model.graph.node[-1].attribute if a.name == "group").i = 0
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    code = main(["compile", str(path), "-q", "--abits", "none"])
    assert code == 3, capsys.readouterr().err


def _graph_model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _folded_function_is_kept(model, feed, stop_after, ops=None):
    rewritten, _ = ocs_onnx.compile(model, abits=None, ratio=0.0, stop_after=stop_after)
    if ops is not None:
        assert [n.op_type for n in rewritten.graph.node] == ops
    expected, actual = run_model(model, feed)[0], run_model(rewritten, feed)[0]
    assert expected.shape == actual.shape and np.isfinite(actual).all()
    assert max_relative_error(expected, actual) < 1e-5


def test_a_constant_that_broadcasts_a_convs_input_to_its_channels_does_not_fold():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(10)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0.5, 1.0, 2.0], np.float32).reshape(1, 3, 1, 1), "c")]
    nodes = [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Conv", ["m", "W"], ["y"], pads=[1, 1, 1, 1])]
    model = _graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    feed = {"x": rng.normal(size=(1, 1, 8, 8)).astype(np.float32)}
    _folded_function_is_kept(model, feed, "fold-affine", ["Mul", "Conv"])


def test_a_shift_over_a_tiny_scale_is_left_as_it_is_before_a_padded_conv():
    # (h + b / c) * c with c = 1e-30 and b = 1e10 would need b / c = 1e40, beyond float32
    model = _affine_then_conv(3, 1, np.array([1e-30] + [1.0] * 7).reshape(1, 8, 1, 1), np.full(8, 1e10).reshape(1, 8, 1, 1))
    feed = {"x": np.random.default_rng(11).normal(size=(2, 8, 6, 6)).astype(np.float32)}
    _folded_function_is_kept(model, feed, "fold-affine", ["Relu", "Mul", "Add", "Conv"])


def test_a_hardswish_whose_constants_would_raise_its_rank_is_not_fused():
    from onnx import TensorProto, helper, numpy_helper

    consts = {"three": np.full((1, 1, 1), 3.0), "zero": 0.0, "six": 6.0, "divisor": 6.0}
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in consts.items()]
    nodes = [
        helper.make_node("Add", ["x", "three"], ["shifted"]),
        helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
        helper.make_node("Mul", ["x", "clipped"], ["product"]),
        helper.make_node("Div", ["product", "divisor"], ["y"]),
    ]
    model = _graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5])], inits, opset=14)
    feed = {"x": np.random.default_rng(12).normal(size=(4, 5)).astype(np.float32) * 3}
    _folded_function_is_kept(model, feed, "fuse-hardswish", ["Add", "Clip", "Mul", "Div"])


def test_a_float16_hardswish_below_opset_14_keeps_its_type():
    from onnx import TensorProto

    model = _spelled_out_hardswish(13)
    for tensor in model.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    rewritten, _ = ocs_onnx.compile(model, abits=None, ratio=0.0, stop_after="fuse-hardswish")
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "HardSigmoid", "Mul"]
    feed = {"x": np.random.default_rng(13).normal(size=(2, 3, 8, 8)).astype(np.float16)}
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-2

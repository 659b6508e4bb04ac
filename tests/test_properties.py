"""Property-based tests: the quantization math on arbitrary arrays, and OCS keeping the function
of arbitrary small Conv/Gemm/MatMul graphs. Derandomized, so every run checks the same examples."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

import ocs_onnx
from ocs_onnx import quant

from .conftest import max_relative_error, run_model

MATH = settings(max_examples=300, derandomize=True, deadline=None, database=None)
GRAPHS = settings(max_examples=40, derandomize=True, deadline=None, database=None)

bits = st.integers(quant.MIN_BITS, quant.MAX_BITS)
# Weights as stored (float32), over the whole finite range: tiny, huge, subnormal, signed zeros.
finite_float32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
weights = arrays(np.float32, st.integers(1, 64), elements=finite_float32)


def q_levels(x: np.ndarray, scale: float) -> np.ndarray:
    """Unclamped levels floor(x / s + 1/2), in float64 as quantize_symmetric computes them."""
    return np.floor(np.asarray(x, dtype=np.float64) / np.float64(scale) + 0.5)


# The split math in float64 over every magnitude a float32 weight can have (subnormals excluded:
# they have too few significant bits to hold both pieces of a split exactly).
FLOAT32_MAX = float(np.finfo(np.float32).max)
normal_float64 = st.floats(-FLOAT32_MAX, FLOAT32_MAX, allow_subnormal=False)


@MATH
@given(arrays(np.float64, st.integers(1, 64), elements=normal_float64), bits)
def test_qa_split_pieces_quantize_to_exactly_the_original_level(w, k):
    scale = float(quant.symmetric_scale(quant.max_abs(w, None), k))
    split = quant.apply_channel_splits(w[None, :], 1, list(range(w.size)), qa_scale=scale)[0]
    a, b = split[: w.size], split[w.size :]  # each value's kept half and its appended copy
    assert np.array_equal(
        quant.quantize_symmetric(a, scale, k) + quant.quantize_symmetric(b, scale, k),
        quant.quantize_symmetric(w, scale, k),
    )


def test_qa_split_pieces_stored_in_float32_quantize_to_the_original_level():
    # w / s = -5.4999999 for the first weight: its exact pieces quantize to levels adding up to
    # Q(w), but the nearest float32 of one piece lies across a level boundary
    w = np.array([-0.879112958908081, 4.955000400543213], np.float32)
    scale = float(quant.symmetric_scale(quant.max_abs(w, None), 6))
    split = quant.apply_channel_splits(w[None, :], 1, [0], qa_scale=scale)[0]
    assert split.dtype == np.float32
    kept, copy = split[0], split[2]
    assert quant.quantize_symmetric(kept, scale, 6) + quant.quantize_symmetric(copy, scale, 6) == (
        quant.quantize_symmetric(w[0], scale, 6)
    )
    # and the pieces still add up to the weight within float32 rounding
    assert abs(float(kept) + float(copy) - float(w[0])) <= 4 * np.spacing(np.float32(abs(w[0])))


@st.composite
def weights_near_level_boundaries(draw):
    """float32 weights a few ulps from w / s = n + 1/2, where a split piece lies on a level
    boundary, with the largest weight (which sets s) first."""
    k = draw(bits)
    qmax = quant.symmetric_qmax(k)
    largest = np.float32(draw(st.floats(1e-30, 1e30)))
    scale = float(largest) / qmax
    levels = draw(st.lists(st.integers(-qmax, qmax - 1), min_size=1, max_size=32))
    ulps = draw(st.lists(st.integers(-8, 8), min_size=len(levels), max_size=len(levels)))
    near = np.array([(level + 0.5) * scale for level in levels], np.float32)
    near = (near.view(np.int32) + np.array(ulps, np.int32)).view(np.float32)
    near = np.clip(near, -largest, largest)
    return np.concatenate([[largest], near]).astype(np.float32), k


@MATH
@given(weights_near_level_boundaries(), st.integers(1, 3))
def test_qa_split_pieces_stored_in_float32_always_quantize_to_the_original_level(case, times):
    w, k = case
    scale = float(quant.symmetric_scale(quant.max_abs(w, None), k))
    # every channel split, and the last one split again (pieces of a piece)
    splits = list(range(w.size)) + [w.size - 1] * (times - 1)
    split = quant.apply_channel_splits(w[None, :], 1, splits, qa_scale=scale)[0]
    assert split.dtype == np.float32
    levels = np.zeros(w.size, np.int64)
    np.add.at(levels, quant.channel_origins(w.size, splits), quant.quantize_symmetric(split, scale, k))
    assert np.array_equal(levels, quant.quantize_symmetric(w, scale, k))
    # the pieces still add up to the weights, within float32 rounding
    sums = np.zeros(w.size)
    np.add.at(sums, quant.channel_origins(w.size, splits), split.astype(np.float64))
    assert np.all(np.abs(sums - w) <= 16 * np.spacing(np.abs(w)) + 4 * np.spacing(np.float32(scale)))


@MATH
@given(weights, bits)
def test_quantization_error_is_at_most_half_a_step_inside_the_range(w, k):
    scale = quant.symmetric_scale(quant.max_abs(w, None), k)
    error = np.abs(quant.fake_quantize_symmetric(w, scale, k) - w.astype(np.float64))
    # half a step, plus the float64 rounding of w / s and of level * s
    assert np.all(error <= scale / 2 * (1 + 1e-9) + np.abs(w) * 1e-15)


@MATH
@given(
    arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=finite_float32),
    bits,
    st.sampled_from([None, 0, 1]),
)
def test_weight_scales_are_positive_and_finite_for_any_weights(w, k, axis):
    for values in (w, np.zeros_like(w)):
        scale = quant.symmetric_scale(quant.max_abs(values, axis), k)
        assert np.all(scale > 0) and np.all(np.isfinite(scale))
        levels = quant.quantize_symmetric(values, scale, k, axis)
        assert np.all(np.abs(levels) <= quant.symmetric_qmax(k))


@MATH
@given(finite_float32, finite_float32, bits)
def test_activation_grids_have_a_positive_scale_and_an_exact_zero(lo, hi, k):
    lo, hi = min(lo, hi), max(lo, hi)
    unsigned = quant.asymmetric_uint8_qparams(lo, hi, k)
    signed = quant.symmetric_int8_qparams(lo, hi, k)
    for params in (unsigned, signed):
        assert params.scale > 0 and np.isfinite(params.scale)
    assert 0 <= unsigned.zero_point <= 2**k - 1 and signed.zero_point == 0


# --------------------------------------------------------------------------------------------
# OCS keeps the function of random small graphs
# --------------------------------------------------------------------------------------------


@st.composite
def linear_graphs(draw):
    """A Conv, Gemm or MatMul (twice, with a Relu between) with random sizes and weights that
    have an outlier, as (model, feed)."""
    op = draw(st.sampled_from(["Conv", "Gemm", "MatMul"]))
    c_in, hidden, c_out = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def weight(shape, in_axis):
        w = rng.standard_normal(shape).astype(np.float32)
        w.flat[rng.integers(w.size)] *= draw(st.floats(1.0, 50.0))  # an outlier of random size
        return w

    batch, spatial = 2, draw(st.integers(1, 4))
    if op == "Conv":
        k = draw(st.sampled_from([1, 3]))
        attrs = {"kernel_shape": [k, k], "pads": [k // 2] * 4}
        w0, w1 = weight((hidden, c_in, k, k), 1), weight((c_out, hidden, k, k), 1)
        x_shape, y_shape = [batch, c_in, spatial, spatial], [batch, c_out, spatial, spatial]
        nodes = [
            helper.make_node("Conv", ["x", "w0"], ["h"], name="conv0", **attrs),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w1"], ["y"], name="conv1", **attrs),
        ]
    elif op == "Gemm":
        trans_b = draw(st.booleans())
        w0 = weight((hidden, c_in) if trans_b else (c_in, hidden), 1 if trans_b else 0)
        w1 = weight((c_out, hidden), 1)
        x_shape, y_shape = [batch, c_in], [batch, c_out]
        nodes = [
            helper.make_node("Gemm", ["x", "w0"], ["h"], name="gemm0", transB=int(trans_b)),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w1"], ["y"], name="gemm1", transB=1),
        ]
    else:  # MatMul on a 3-D activation: channels on the last axis
        w0, w1 = weight((c_in, hidden), 0), weight((hidden, c_out), 0)
        x_shape, y_shape = [batch, spatial, c_in], [batch, spatial, c_out]
        nodes = [
            helper.make_node("MatMul", ["x", "w0"], ["h"], name="matmul0"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w1"], ["y"], name="matmul1"),
        ]
    graph = helper.make_graph(
        nodes,
        "random_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


@GRAPHS
@given(
    linear_graphs(),
    st.floats(0.05, 1.0),
    st.sampled_from(["qa", "naive"]),
    st.sampled_from(["channel", "tensor"]),
    st.integers(2, 8),
)
def test_ocs_split_without_quantization_computes_the_same_function(graph, ratio, split, granularity, wbits):
    model, feed = graph
    rewritten, report = ocs_onnx.compile(
        model,
        abits=None,
        wbits=wbits,
        ratio=ratio,
        split=split,
        granularity=granularity,
        ocs_guard=False,
        stop_after="qa-split",
    )
    assert report["totals"]["channels_split"] > 0
    expected, actual = run_model(model, feed)[0], run_model(rewritten, feed)[0]
    assert expected.shape == actual.shape
    assert max_relative_error(expected, actual) < 1e-5

"""The numeric conventions of ocs-onnx, checked on plain arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ocs_onnx import quant


def test_symmetric_grid_has_2_to_the_k_minus_1_points():
    assert [quant.symmetric_qmax(k) for k in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]


@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError):
        quant.symmetric_qmax(bits)


def test_rounding_is_half_up_and_clamped_symmetric():
    scale = np.float64(1.0)
    w = np.array([0.5, 1.5, -0.5, -1.5, 2.49, 100.0, -100.0])
    assert quant.quantize_symmetric(w, scale, bits=4).tolist() == [1, 2, 0, -1, 2, 7, -7]


def test_scale_is_max_abs_over_qmax_per_tensor_and_per_channel():
    w = np.array([[1.0, -4.0], [0.5, 2.0]], dtype=np.float32)
    assert quant.symmetric_scale(quant.max_abs(w, None), 8) == pytest.approx(4.0 / 127)
    np.testing.assert_allclose(quant.symmetric_scale(quant.max_abs(w, 0), 8), [4.0 / 127, 2.0 / 127])


def test_all_zero_weights_get_a_nonzero_scale_and_quantize_to_zero():
    w = np.zeros((3, 4), dtype=np.float32)
    scale = quant.symmetric_scale(quant.max_abs(w, 0), 6)
    assert np.all(scale > 0)
    assert np.all(quant.quantize_symmetric(w, scale, 6, axis=0) == 0)


def test_qa_split_keeps_the_quantized_value_exactly():
    """Paper eq. 7: Q((w - s/2)/2) + Q((w + s/2)/2) == Q(w) for any w and scale."""
    rng = np.random.default_rng(0)
    for bits in (2, 4, 6, 8):
        for dtype in (np.float64, np.float32):
            w = (rng.laplace(size=20000) * rng.uniform(0.01, 10)).astype(dtype)
            # Any scale: the identity is about rounding, so compared on unclamped levels.
            scale = np.float64(rng.uniform(0.001, 1.0))
            a, b = quant.split_on_levels(w, scale)
            assert a.dtype == b.dtype == w.dtype
            # The pieces are the quantization-aware ones (up to the few ulps that fix a rounding),
            # and they add up to the weight.
            np.testing.assert_allclose(a, (w - scale / 2) / 2, rtol=1e-5, atol=scale * 1e-6)
            np.testing.assert_allclose(b, (w + scale / 2) / 2, rtol=1e-5, atol=scale * 1e-6)
            np.testing.assert_allclose(a.astype(np.float64) + b, w, rtol=1e-5, atol=scale * 1e-6)
            unclamped = np.floor(w.astype(np.float64) / scale + 0.5)
            assert np.array_equal(quant.quantization_levels(w, scale), unclamped), (bits, dtype)
            levels = quant.quantization_levels(a, scale) + quant.quantization_levels(b, scale)
            assert np.array_equal(levels, unclamped), (bits, dtype)
            # With the scale of the weight's own range nothing clamps: the quantizer itself agrees.
            scale = quant.symmetric_scale(quant.max_abs(w, None), bits)
            a, b = quant.split_on_levels(w, scale)
            q_pieces = quant.quantize_symmetric(a, scale, bits) + quant.quantize_symmetric(b, scale, bits)
            assert np.array_equal(q_pieces, quant.quantize_symmetric(w, scale, bits)), (bits, dtype)


def test_naive_split_does_not_always_keep_the_quantized_value():
    """w = 3 steps: each half is 1.5 steps and both round up, giving 4."""
    scale = np.float64(1.0)
    w = np.array([[3.0]])  # one input channel, along axis 1
    naive = quant.apply_channel_splits(w, 1, [0])
    assert naive.tolist() == [[1.5, 1.5]]
    assert quant.quantize_symmetric(naive, scale, 4).tolist() == [[2, 2]]
    assert quant.quantize_symmetric(w, scale, 4).tolist() == [[3]]
    # The quantization-aware split of the same weight keeps it: 1.25 and 1.75 steps give 1 + 2.
    qa = quant.apply_channel_splits(w, 1, [0], qa_scale=scale)
    assert qa.tolist() == [[1.25, 1.75]]
    assert quant.quantize_symmetric(qa, scale, 4).sum() == 3
    # On random weights the naive split's levels often add up to one level more or less.
    w = np.random.default_rng(1).uniform(-20, 20, size=(1000, 1))
    naive = quant.apply_channel_splits(w, 1, [0])
    np.testing.assert_array_equal(naive, np.hstack([w / 2, w / 2]))
    q_naive = quant.quantize_symmetric(naive, scale, 8).sum(axis=1)
    q_w = quant.quantize_symmetric(w, scale, 8)[:, 0]
    assert not np.array_equal(q_naive, q_w)
    assert np.all(np.abs(q_naive - q_w) <= 1)


def test_split_count_is_ceil_of_ratio_times_channels():
    assert quant.split_count(0.02, 64) == 2
    assert quant.split_count(0.02, 50) == 1
    assert quant.split_count(0.07, 100) == 7  # not 8: 0.07 * 100 is 7.000000000000001 in floats
    assert quant.split_count(0.0, 64) == 0
    assert quant.split_count(0.5, 1) == 1


def test_channel_selection_takes_the_largest_channel_and_may_split_a_copy_again():
    w = np.array([[1.0, 8.0, 3.0]], dtype=np.float32)  # input channels along axis 1
    # 8 -> 4,4 ; then the copy of 4 vs 4: first index wins (channel 1), then 3
    splits = quant.plan_channel_splits(w, in_axis=1, n_splits=3)
    assert splits == [1, 1, 3]
    assert quant.channel_origins(3, splits) == [0, 1, 2, 1, 1, 1]


def test_split_pieces_add_up_to_the_original_channel():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 7, 3, 3)).astype(np.float32)
    splits = quant.plan_channel_splits(w, 1, 4)
    origins = quant.channel_origins(7, splits)
    for qa_scale in (None, np.float64(0.05), np.linspace(0.01, 0.1, 5)):
        split = quant.apply_channel_splits(w, 1, splits, qa_scale=qa_scale, out_axis=0)
        assert split.shape == (5, 11, 3, 3)
        np.testing.assert_allclose(quant.merge_split_channels(split, 1, origins, 7), w, rtol=1e-6, atol=1e-7)


def test_splitting_shrinks_the_range_and_the_scale():
    w = np.ones((4, 8), dtype=np.float32)
    w[2, 5] = 10.0  # one outlier, input channels along axis 1
    splits = quant.plan_channel_splits(w, 1, 1)
    split = quant.apply_channel_splits(w, 1, splits)
    assert np.abs(split).max() == pytest.approx(5.0)


def test_qa_split_quantizes_like_the_unsplit_weight_with_the_same_scale():
    """With the scale fixed, QA splitting leaves Q(merged) == Q(w): no extra rounding error."""
    rng = np.random.default_rng(3)
    w = rng.laplace(size=(16, 32)).astype(np.float32)
    splits = quant.plan_channel_splits(w, 0, 6)
    naive = quant.apply_channel_splits(w, 0, splits)
    scale = quant.symmetric_scale(quant.max_abs(naive, None), 4)
    qa = quant.apply_channel_splits(w, 0, splits, qa_scale=scale)
    origins = quant.channel_origins(16, splits)
    q_pieces = quant.quantize_symmetric(qa, scale, 4).astype(np.float64)
    merged_levels = quant.merge_split_channels(q_pieces, 0, origins, 16)
    unclamped = np.floor(w.astype(np.float64) / scale + 0.5)
    assert np.array_equal(merged_levels, unclamped)


def test_sqnr_is_none_when_exact_and_grows_with_bits():
    w = np.random.default_rng(4).standard_normal(1000)
    assert quant.sqnr_db(w, w) is None
    values = [
        quant.sqnr_db(w, quant.fake_quantize_symmetric(w, quant.symmetric_scale(quant.max_abs(w, None), k), k))
        for k in (4, 6, 8)
    ]
    assert values[0] < values[1] < values[2]


def test_asymmetric_activation_range_always_contains_zero():
    qp = quant.asymmetric_uint8_qparams(0.5, 2.0, 8)  # min > 0: extended down to 0
    assert qp.zero_point == 0 and qp.scale == pytest.approx(2.0 / 255, rel=1e-6)
    qp = quant.asymmetric_uint8_qparams(-1.0, 3.0, 8)
    assert qp.zero_point == 64 and qp.dtype == np.uint8
    assert quant.asymmetric_uint8_qparams(0.0, 0.0, 8).scale == 1.0


def test_symmetric_activation_uses_zero_point_zero():
    qp = quant.symmetric_int8_qparams(-2.0, 1.0, 8)
    assert qp.zero_point == 0 and qp.dtype == np.int8 and qp.scale == pytest.approx(2.0 / 127, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Activation OCS
# --------------------------------------------------------------------------------------------


def test_activation_splits_take_the_channels_with_most_outliers_and_never_an_empty_one():
    counts = np.array([0, 7, 3, 7, 0, 1, 0, 0, 0, 0])
    assert quant.plan_activation_splits(counts, 0.2) == [1, 3]  # ceil(0.2 * 10) = 2, tie -> lower index
    assert quant.plan_activation_splits(counts, 0.25) == [1, 2, 3]
    assert quant.plan_activation_splits(counts, 1.0) == [1, 2, 3, 5]  # channels without outliers stay
    assert quant.plan_activation_splits(counts, 0.0) == []


def _quantize_activation_half_up(x, qp, bits):
    return np.clip(np.floor(x / qp.scale + 0.5) + qp.zero_point, 0, 2**bits - 1)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_quantization_aware_activation_split_adds_up_to_the_quantized_activation(bits):
    rng = np.random.default_rng(bits)
    x = rng.uniform(-1.0, 3.0, size=50000)
    qp = quant.asymmetric_uint8_qparams(x.min(), x.max() / 2, bits)  # the split tensor's range
    factor, offset = quant.activation_split_factors(1, [0])
    a, b = x * factor[0] + offset[0] * qp.scale, x * factor[1] + offset[1] * qp.scale
    assert np.allclose(a + b, x)
    inside = np.abs(x) <= (x.max() / 2)  # where neither half saturates
    levels = lambda v: _quantize_activation_half_up(v, qp, bits)[inside] - qp.zero_point  # noqa: E731
    split_x = qp.zero_point + levels(a) + levels(b)
    assert np.array_equal(
        split_x, np.floor(x[inside] / qp.scale + 0.5) + qp.zero_point
    )  # Q(a) + Q(b) == Q(x) on x's grid
    naive = levels(x / 2) + levels(x / 2)
    assert not np.array_equal(naive, np.floor(x[inside] / qp.scale + 0.5))


def test_activation_split_factors_halve_both_copies():
    factor, offset = quant.activation_split_factors(4, [1, 3])
    assert factor.tolist() == [1.0, 0.5, 1.0, 0.5, 0.5, 0.5]
    assert offset.tolist() == [0.0, -0.25, 0.0, -0.25, 0.25, 0.25]


def test_histogram_sqnr_estimate_matches_the_exact_sqnr():
    from ocs_onnx.histogram import SymmetricHistogram

    x = np.random.default_rng(7).normal(1.0, 1.0, size=200000)
    histogram = SymmetricHistogram()
    histogram.update(x)
    for bits in (4, 6, 8):
        qp = quant.asymmetric_uint8_qparams(x.min(), x.max(), bits)
        exact = quant.sqnr_db(x, quant.fake_quantize_activation(x, qp, bits))
        estimate = quant.histogram_sqnr_db(histogram.counts, histogram.edges, qp, bits)
        assert estimate == pytest.approx(exact, abs=0.5)

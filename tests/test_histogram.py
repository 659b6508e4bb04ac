"""The streaming calibration histogram: exact counts, constant memory, range growth."""

from __future__ import annotations

import numpy as np
import pytest

from ocs_onnx.histogram import ChannelHistograms, SymmetricHistogram, halve


def test_one_batch_counts_match_numpy_histogram():
    x = np.random.default_rng(0).standard_normal(10000)
    h = SymmetricHistogram(bins=64)
    h.update(x)
    expected, _ = np.histogram(x, bins=h.edges)
    assert np.array_equal(h.counts, expected)
    assert h.limit == pytest.approx(np.abs(x).max())


def test_growing_range_merges_bins_exactly():
    rng = np.random.default_rng(1)
    small, large = rng.uniform(-1, 1, 5000), rng.uniform(-3.5, 3.5, 5000)
    h = SymmetricHistogram(bins=64)
    h.update(small)
    h.update(large)
    assert h.total == 10000
    assert h.limit >= np.abs(large).max()
    # The same counts as a one-shot histogram over the final edges, for data seen before the
    # growth the doubled bins are unions of old bins, so nothing moves to a wrong bin.
    expected, _ = np.histogram(np.concatenate([small, large]), bins=h.edges)
    assert np.array_equal(h.counts, expected)


def test_memory_does_not_grow_with_the_number_of_batches():
    h = SymmetricHistogram(bins=128)
    rng = np.random.default_rng(2)
    for _ in range(200):
        h.update(rng.laplace(size=1000))
    assert h.counts.shape == (128,) and h.total == 200_000


def test_absolute_histogram_folds_the_two_halves():
    h = SymmetricHistogram(bins=8)
    h.update(np.array([-1.0, -0.1, 0.1, 0.6, 1.0]))
    counts, edges = h.absolute()
    assert counts.tolist() == [2, 0, 1, 2] and edges[0] == 0.0 and edges[-1] == 1.0


def test_all_zero_batches_are_counted_without_a_range():
    h = SymmetricHistogram(bins=8)
    h.update(np.zeros(10))
    assert h.total == 10 and h.limit == 0.0


# --------------------------------------------------------------------------------------------
# Per-channel histograms (activation OCS)
# --------------------------------------------------------------------------------------------


def test_channel_histograms_add_up_to_the_tensor_histogram_through_range_growth():
    rng = np.random.default_rng(3)
    batches = [rng.normal(0, scale, size=(4, 6, 5, 5)) for scale in (0.5, 1.0, 4.0)]
    per_channel, whole = ChannelHistograms(6, bins=64), SymmetricHistogram(bins=64)
    for batch in batches:
        per_channel.update(batch, axis=1)
        whole.update(batch)
    assert per_channel.limit == whole.limit
    assert np.array_equal(per_channel.tensor_histogram().counts, whole.counts)
    values = np.concatenate(batches)
    channel_two, _ = np.histogram(values[:, 2], bins=whole.edges)
    assert np.array_equal(per_channel.counts[2], channel_two)
    assert np.allclose(per_channel.hi, values.max(axis=(0, 2, 3)))
    assert np.allclose(per_channel.lo, values.min(axis=(0, 2, 3)))


def test_channels_on_the_last_axis():
    values = np.random.default_rng(4).normal(size=(3, 7, 5))
    per_channel = ChannelHistograms(5, bins=32)
    per_channel.update(values, axis=-1)
    expected, _ = np.histogram(values[..., 4], bins=per_channel.tensor_histogram().edges)
    assert np.array_equal(per_channel.counts[4], expected)


def test_halving_a_histogram_is_exact():
    x = np.random.default_rng(5).normal(size=20000)
    full = SymmetricHistogram(bins=128)
    full.update(x)
    direct = SymmetricHistogram(bins=128)
    direct.limit = full.limit  # the same range, so that only the halving differs
    direct.update(x / 2)
    assert np.array_equal(halve(full).counts, direct.counts)


def test_outlier_counts_are_the_values_beyond_the_99th_percentile_per_channel():
    rng = np.random.default_rng(6)
    values = rng.uniform(0, 1, size=(1000, 4))
    # 1 % of all values are outliers: 25 in channel 1, 15 in channel 3.
    values[:25, 1] = 10.0
    values[100:115, 3] = 9.0
    per_channel = ChannelHistograms(4)
    per_channel.update(values, axis=-1)
    assert per_channel.counts_beyond_percentile(99.0).tolist() == [0, 25, 0, 15]

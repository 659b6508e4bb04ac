"""The streaming calibration histogram: exact counts, constant memory, range growth."""

from __future__ import annotations

import numpy as np
import pytest

from ocs_onnx.histogram import SymmetricHistogram


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

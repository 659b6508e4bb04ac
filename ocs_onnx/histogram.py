"""A streaming histogram of a tensor's values for calibration, in constant memory.

The histogram covers [-R, R] with a fixed, even number of equal bins centred on zero. The range
starts at the first batch's max |x| and, when a later batch goes beyond it, doubles as often as
needed: each doubling merges pairs of neighbouring bins, so old counts land exactly in the new
bins (no interpolation, no second pass over the data). A symmetric layout serves both grids:
folded at zero it is the histogram of |x| that symmetric clip methods read, and its two halves
give the tails that asymmetric activations clip.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BINS = 2048


def _merge_into_middle(counts: np.ndarray) -> np.ndarray:
    """Counts (bins on the last axis) after the range doubles: pairs of neighbouring bins merge
    into one, and the merged histogram fills the middle half."""
    bins = counts.shape[-1]
    merged = counts.reshape(*counts.shape[:-1], bins // 2, 2).sum(axis=-1)
    doubled = np.zeros_like(counts)
    doubled[..., bins // 4 : bins // 4 + bins // 2] = merged
    return doubled


def _bin_index(values: np.ndarray, limit: float, bins: int) -> np.ndarray:
    """The bin of every value in a histogram of ``bins`` equal bins over [-limit, limit]."""
    position = np.add(values, limit)  # one temporary, scaled in place (calibration's hot loop)
    position *= bins / (2 * limit)
    # clipped to [0, bins - 1] first, the cast's truncation is the floor: no np.floor pass
    np.clip(position, 0, bins - 1, out=position)
    return position.astype(np.intp)


class SymmetricHistogram:
    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 2 or bins % 4:
            raise ValueError("bins must be a positive multiple of 4")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.limit = 0.0  # R: the histogram spans [-R, R]

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    def update(self, values: np.ndarray, peak: float | None = None) -> None:
        """Adds ``values``; ``peak``, their max |x|, where the caller has it already."""
        values = np.asarray(values).ravel()
        if values.dtype != np.float32:  # float32 activations are binned as they are: no float64 copy
            values = values.astype(np.float64)
        if values.size == 0:
            return
        peak = float(max(values.max(), -values.min())) if peak is None else float(peak)
        if self.limit == 0.0:
            if peak == 0.0:
                self.counts[self.bins // 2] += values.size  # all zeros: the bin just above 0
                return
            self.limit = peak
        while peak > self.limit:
            self.counts = _merge_into_middle(self.counts)
            self.limit *= 2.0
        self.counts += np.bincount(_bin_index(values, self.limit, self.bins), minlength=self.bins)

    def absolute(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of |x|: counts over ``bins / 2`` bins and their edges, from 0 to R."""
        half = self.bins // 2
        counts = self.counts[half:] + self.counts[:half][::-1]
        return counts, np.linspace(0.0, self.limit, half + 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def merged_histogram(histograms: list[SymmetricHistogram]) -> SymmetricHistogram:
    """One histogram of the values of several tensors (the union a shared scale must cover), on
    the widest one's range: the others' bins are moved to the bins their centres fall in (exact
    when the ranges differ by powers of 2, within a bin otherwise)."""
    bins = histograms[0].bins
    merged = SymmetricHistogram(bins)
    merged.limit = max(h.limit for h in histograms)
    for h in histograms:
        if h.limit == merged.limit or h.limit == 0.0:
            merged.counts += h.counts
            continue
        centres = (np.arange(h.bins) + 0.5) / h.bins * 2 * h.limit - h.limit
        np.add.at(merged.counts, _bin_index(centres, merged.limit, bins), h.counts)
    return merged


class ChannelHistograms:
    """One histogram per channel of a tensor, on a shared range that grows like
    ``SymmetricHistogram``'s. Activation OCS reads it twice: to find the channels that hold the
    tensor's outliers, and to build the histogram the tensor will have once those channels are
    split, without running the model again."""

    def __init__(self, channels: int, bins: int = DEFAULT_BINS):
        if bins < 2 or bins % 4:
            raise ValueError("bins must be a positive multiple of 4")
        self.bins = bins
        self.counts = np.zeros((channels, bins), dtype=np.int64)
        self.limit = 0.0
        self.lo = np.full(channels, np.inf)
        self.hi = np.full(channels, -np.inf)

    @property
    def channels(self) -> int:
        return self.counts.shape[0]

    def update(self, values: np.ndarray, axis: int) -> None:
        """Adds ``values``, whose ``axis`` holds the channels."""
        per_channel = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1).reshape(-1, self.channels)
        if per_channel.size == 0:
            return
        self.lo = np.minimum(self.lo, per_channel.min(axis=0))
        self.hi = np.maximum(self.hi, per_channel.max(axis=0))
        peak = float(np.abs(per_channel).max())
        if self.limit == 0.0:
            if peak == 0.0:
                self.counts[:, self.bins // 2] += per_channel.shape[0]
                return
            self.limit = peak
        while peak > self.limit:
            self.counts = _merge_into_middle(self.counts)
            self.limit *= 2.0
        index = _bin_index(per_channel, self.limit, self.bins)
        index += np.arange(self.channels, dtype=np.int64) * self.bins  # one block of bins per channel
        self.counts += np.bincount(index.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def tensor_histogram(self, channels: np.ndarray | None = None) -> SymmetricHistogram:
        """The histogram of the whole tensor (or of the listed channels, with repeats)."""
        histogram = SymmetricHistogram(self.bins)
        histogram.limit = self.limit
        rows = self.counts if channels is None else self.counts[np.asarray(channels, dtype=np.int64)]
        histogram.counts = rows.sum(axis=0)
        return histogram

    def counts_beyond_percentile(self, percentile: float) -> np.ndarray:
        """Per channel, how many |values| lie above the bin that holds the tensor's
        ``percentile``-th percentile of |x| (the outlier count of paper sec. 5.3)."""
        half = self.bins // 2
        folded = self.counts[:, half:] + self.counts[:, :half][:, ::-1]  # |x|, bin 0 at zero
        cumulative = np.cumsum(folded.sum(axis=0))
        if cumulative[-1] == 0:
            return np.zeros(self.channels, dtype=np.int64)
        boundary = int(np.searchsorted(cumulative, percentile / 100.0 * cumulative[-1]))
        return folded[:, boundary + 1 :].sum(axis=1)


def halve(histogram: SymmetricHistogram) -> SymmetricHistogram:
    """The histogram of the same values divided by two, on the same range. Exact: with bin edges
    at multiples of the bin width w, bin [i*w, (i+1)*w) halves into the bin [floor(i/2)*w, ...)."""
    half = histogram.bins // 2
    target = (np.arange(histogram.bins) - half) // 2 + half
    halved = SymmetricHistogram(histogram.bins)
    halved.limit = histogram.limit
    halved.counts = np.bincount(target, weights=histogram.counts, minlength=histogram.bins).astype(np.int64)
    return halved

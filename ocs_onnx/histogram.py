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

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        peak = float(np.abs(values).max())
        if self.limit == 0.0:
            if peak == 0.0:
                self.counts[self.bins // 2] += values.size  # all zeros: the bin just above 0
                return
            self.limit = peak
        while peak > self.limit:
            self._double_range()
        index = np.floor((values + self.limit) / (2 * self.limit) * self.bins).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double_range(self) -> None:
        # Pairs of bins merge into one; the merged histogram fills the middle half.
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.zeros_like(self.counts)
        quarter = self.bins // 4
        self.counts[quarter : quarter + merged.size] = merged
        self.limit *= 2.0

    def absolute(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of |x|: counts over ``bins / 2`` bins and their edges, from 0 to R."""
        half = self.bins // 2
        counts = self.counts[half:] + self.counts[:half][::-1]
        return counts, np.linspace(0.0, self.limit, half + 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

"""Clip thresholds for symmetric k-bit quantization (paper sec. 4), on plain numpy arrays.

Every function returns ``alpha``, the clip threshold: the grid of ``quant.py`` then uses
``scale = alpha / qmax`` with ``qmax = 2**(k-1) - 1`` levels each side of zero (2^k - 1 points).
Thresholds are never above max|x| (clipping only ever shrinks the range) and are 0.0 only when
every value is 0 (``percentile_threshold`` excepted: it is numpy's percentile, 0 for a low
percentile of mostly-zero data; ``weight_clip_threshold`` then uses max|x|). No graph code here;
``2 <= bits <= 8`` as everywhere in the compiler.

Methods (names in ``CLIP_METHODS``):

* ``none``: alpha = max|x|, linear quantization of the whole range (Hubara et al., 2017).
* ``mse``: the alpha that minimises the mean squared error between x and its
  quantized-dequantized value, clipping error and rounding error together (Sung et al., 2015;
  Shin et al., 2016; paper sec. 4.1). ``mse_threshold_exact`` works on the exact values (weights);
  ``mse_threshold_histogram`` on a calibration histogram whose bin centres stand for the values
  (activations). Both sweep a grid of candidates and then zoom in around the best one.
* ``aciq``: Banner et al., 2018 ("ACIQ: Analytical Clipping for Integer Quantization"; paper sec.
  4.2). Fit a Gaussian (sigma = std) and a Laplace (b = mean |x - mean|), take each one's
  MSE-optimal threshold ``c_k * sigma`` / ``c_k * b`` from a precomputed table, and keep the one
  with the lower MSE on the actual data. Like the OCS authors we use a grid of 2^k - 1 points
  instead of Banner's 2^k, so the constants are our own (see ``ACIQ_GAUSSIAN_ALPHA``).
* ``kl``: TensorRT's entropy calibration (Migacz, 2017) as implemented in Apache MXNet
  (``_get_optimal_threshold`` in ``mxnet/contrib/quantization.py``; paper sec. 4.3): the threshold
  whose clipped histogram, merged into 2^k - 1 quantized bins, loses the least information
  (Kullback-Leibler divergence). MXNet used 255 bins (8 bits); like the paper we use 2^k - 1.
* ``percentile``: the given percentile of |x| (McKinstry et al., 2018, used 99.99 for 8 bits and
  99.9 for 4 bits), exactly ``np.percentile(np.abs(x), p)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import quant

CLIP_METHODS = ("none", "mse", "aciq", "kl", "percentile")

# Candidate thresholds of the first MSE sweep, evenly spaced over (0, max|x|].
DEFAULT_MSE_CANDIDATES = 512
# Each refinement round sweeps +-1 previous spacing around the best alpha with this many points a
# side, so the spacing shrinks by this factor per round (512 * 16**3: resolution ~5e-7 * max|x|).
_REFINE_POINTS_PER_SIDE = 16
_REFINE_ROUNDS = 3
# (candidate, grid cell) pairs evaluated at once by the MSE search (~1 MB per temporary array).
_CELLS_PER_CHUNK = 1 << 17

# Histogram of |w| that the "kl" method builds for weights.
KL_WEIGHT_HISTOGRAM_BINS = 2048
# MXNet's _smooth_distribution default.
KL_SMOOTHING_EPS = 1e-4

# ACIQ constants: for a unit Gaussian (sigma = 1) and a unit Laplace (b = 1), the alpha that
# minimises the *exact* expected MSE E[(X - Q(X))^2] of the k-bit grid used here (2^k - 1 points,
# step alpha / qmax, round to nearest, clamp to +-alpha), for k = 2..8. The expectation is the sum
# over the grid cells of int (x - level)^2 f(x) dx, plus int_{alpha - step/2}^inf (x - alpha)^2 f(x)
# dx for the clipped tail, each in closed form (Gaussian: Phi and phi; Laplace: exponentials),
# evaluated with mpmath at 40 digits and minimised by a 200-point scan followed by golden-section
# search. Banner et al. instead minimise an approximation (clipping error + alpha^2 / (3 * 4^M),
# i.e. uniform rounding noise on 2^M points); the two agree at 8 bits (Banner: 3.92 and 9.89) and
# differ at low bit widths, where the uniform-noise approximation is poor. For Laplace at 2 bits
# the optimum is exactly 2b: the tail mean beyond alpha/2 must equal alpha (memorylessness).
# tests/test_clip.py recomputes both tables independently with scipy.
ACIQ_GAUSSIAN_ALPHA = {
    2: 1.224006,
    3: 1.952309,
    4: 2.473879,
    5: 2.898728,
    6: 3.270115,
    7: 3.607461,
    8: 3.920501,
}
ACIQ_LAPLACE_ALPHA = {
    2: 2.000000,
    3: 3.486401,
    4: 4.819915,
    5: 6.098037,
    6: 7.358589,
    7: 8.617835,
    8: 9.882652,
}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def grid_levels(bits: int, symmetric: bool = True) -> int:
    """Levels on one side of zero: 2^(k-1) - 1 for the symmetric grid, 2^k - 1 for an unsigned one."""
    if symmetric:
        return quant.symmetric_qmax(bits)
    return 2 ** quant.check_bits(bits) - 1


def _finite_magnitudes(values: np.ndarray) -> np.ndarray:
    """|x| flattened, refusing NaN/inf (a threshold of inf or NaN would poison every scale)."""
    magnitudes = np.abs(np.asarray(values).ravel())
    if not np.all(np.isfinite(magnitudes)):
        raise ValueError("values contain NaN or infinity; no clip threshold can be chosen")
    return magnitudes


def _check_histogram(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts, dtype=np.float64).ravel()
    edges = np.asarray(edges, dtype=np.float64).ravel()
    if edges.size != counts.size + 1:
        raise ValueError(f"a histogram of {counts.size} bins needs {counts.size + 1} edges, got {edges.size}")
    if counts.size == 0:
        raise ValueError("the histogram has no bins")
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("histogram counts must be finite and non-negative")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ValueError("histogram edges must be finite and strictly increasing")
    return counts, edges


def _check_magnitude_histogram(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A histogram of |x|: edges start at 0."""
    counts, edges = _check_histogram(counts, edges)
    if edges[0] != 0.0:
        raise ValueError(f"a histogram of |x| must start at 0, its first edge is {edges[0]}")
    return counts, edges


def _histogram_max(counts: np.ndarray, edges: np.ndarray) -> float:
    """The best known max|x| of a histogram of |x|: the upper edge of its last non-empty bin."""
    nonempty = np.flatnonzero(counts)
    return float(edges[nonempty[-1] + 1]) if nonempty.size else 0.0


def quantization_mse(values: np.ndarray, bits: int, alpha: float) -> float:
    """Mean squared error of x against Q(x) on the symmetric grid clipped at ``alpha`` (quant.py)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return 0.0
    scale = quant.symmetric_scale(alpha, bits)
    return float(np.mean((x - quant.fake_quantize_symmetric(x, scale, bits)) ** 2))


def _fake_quantize_unsigned(x: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    """x >= 0 on the unsigned grid 0..2^k-1 with zero point 0 (quant.py has no unsigned fake-quantizer).

    Same rounding as quant.quantize_symmetric (half up), scale = alpha / (2^k - 1) as in
    quant.asymmetric_uint8_qparams(0, alpha, bits).
    """
    levels = grid_levels(bits, symmetric=False)
    scale = alpha / levels if alpha > 0 else 1.0
    return np.clip(np.floor(x / scale + 0.5), 0, levels) * scale


def histogram_mse(counts: np.ndarray, edges: np.ndarray, bits: int, alpha: float, symmetric: bool = True) -> float:
    """Eq. 9 of the paper: mean over the bins (weighted by count) of (c - Q(c))^2, c = bin centre.

    ``symmetric=True``: a histogram of |x| on the symmetric grid. ``symmetric=False``: a histogram
    of non-negative x (e.g. after ReLU) on the unsigned grid of 2^k - 1 steps over [0, alpha].
    """
    counts, edges = _check_magnitude_histogram(counts, edges)
    total = counts.sum()
    if total == 0:
        return 0.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    if symmetric:
        dequantized = quant.fake_quantize_symmetric(centres, quant.symmetric_scale(alpha, bits), bits)
    else:
        dequantized = _fake_quantize_unsigned(centres, alpha, bits)
    return float(np.sum(counts * (centres - dequantized) ** 2) / total)


# --------------------------------------------------------------------------------------------
# MSE: sweep + zoom over prefix sums of sorted magnitudes
# --------------------------------------------------------------------------------------------


class _SortedMagnitudes:
    """Sorted magnitudes a_i >= 0 (with weights), ready to give the squared error of any grid fast.

    A grid with step s = alpha / L rounds a to level n when (n - 1/2) s <= a < (n + 1/2) s, and
    every a >= (L - 1/2) s to alpha = L s (the top cell and the clipped tail have the same error,
    (a - alpha)^2). The error of a cell with centre c is sum w (a - c)^2 = S2 - 2 c S1 + c^2 S0,
    with S0, S1, S2 the sums of w, w a, w a^2 over the cell: differences of prefix sums, found with
    one binary search per cell boundary. So one candidate costs O(L log n) instead of O(n) and the
    search can afford thousands of candidates on millions of values, exactly (up to float64
    rounding; the final choice is re-checked with quant.py's own quantizer).

    The error is even in x (a tie rounds up for x and down for -x, but both are half a step
    away), so the magnitudes suffice.
    """

    def __init__(self, sorted_values: np.ndarray, weights: np.ndarray | None = None):
        a = np.asarray(sorted_values, dtype=np.float64)
        w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
        self.values = a
        zero = np.zeros(1)
        self.cum_w = np.concatenate([zero, np.cumsum(w)])
        self.cum_wa = np.concatenate([zero, np.cumsum(w * a)])
        self.cum_waa = np.concatenate([zero, np.cumsum(w * a * a)])

    def squared_errors(self, alphas: np.ndarray, levels: int) -> np.ndarray:
        """Total weighted squared error for each alpha (> 0) on the grid of ``levels`` steps."""
        alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
        # a few (alphas x cells) arrays at a time: bounded memory whatever the number of candidates
        chunk = max(1, _CELLS_PER_CHUNK // (levels + 1))
        return np.concatenate([self._chunk_errors(alphas[i : i + chunk], levels) for i in range(0, alphas.size, chunk)])

    def _chunk_errors(self, alphas: np.ndarray, levels: int) -> np.ndarray:
        step = alphas[:, None] / levels
        # upper boundary of cells 0 .. levels-1; the top cell [.., inf) has no upper boundary
        cuts = np.searchsorted(self.values, (np.arange(levels) + 0.5) * step, side="left")
        first = np.concatenate([np.zeros((alphas.size, 1), dtype=cuts.dtype), cuts], axis=1)
        stop = np.concatenate([cuts, np.full((alphas.size, 1), self.values.size, dtype=cuts.dtype)], axis=1)
        centre = np.arange(levels + 1) * step
        s0 = self.cum_w[stop] - self.cum_w[first]
        s1 = self.cum_wa[stop] - self.cum_wa[first]
        s2 = self.cum_waa[stop] - self.cum_waa[first]
        # a cell's error is >= 0; prefix-sum cancellation can leave a tiny negative remainder
        return np.maximum(s2 - 2.0 * centre * s1 + centre**2 * s0, 0.0).sum(axis=1)


def _sweep_and_zoom(sample: _SortedMagnitudes, levels: int, alpha_max: float, candidates: int) -> float:
    """Best alpha in (0, alpha_max]: an even sweep, then rounds of finer sweeps around the best.

    The error curve is jagged on small samples (it jumps as values cross cell boundaries), so a
    zoom over a local grid is used rather than golden-section search, which assumes one minimum.
    Ties go to the smaller alpha of a sweep; a zoom only moves to a strictly lower error.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    alphas = alpha_max * np.arange(1, candidates + 1) / candidates
    errors = sample.squared_errors(alphas, levels)
    best = int(np.argmin(errors))
    best_alpha, best_error = float(alphas[best]), float(errors[best])
    spacing = alpha_max / candidates
    for _ in range(_REFINE_ROUNDS):
        offsets = np.arange(-_REFINE_POINTS_PER_SIDE, _REFINE_POINTS_PER_SIDE + 1) / _REFINE_POINTS_PER_SIDE
        local = best_alpha + spacing * offsets
        local = local[(local > 0) & (local <= alpha_max)]
        local_errors = sample.squared_errors(local, levels)
        i = int(np.argmin(local_errors))
        if local_errors[i] < best_error:
            best_alpha, best_error = float(local[i]), float(local_errors[i])
        spacing /= _REFINE_POINTS_PER_SIDE
    return best_alpha


def mse_threshold_exact(values: np.ndarray, bits: int, candidates: int = DEFAULT_MSE_CANDIDATES) -> float:
    """The alpha in (0, max|x|] minimising mean((x - Q(x))^2) over all the given values (weights).

    Exact: no histogram and no subsampling. |x| is sorted once and each candidate is evaluated
    from prefix sums (see ``_SortedMagnitudes``; ~0.15 s in all for 2.4 million values):
    ``candidates`` evenly spaced thresholds, then three zoom rounds of 33 points. The winner is
    re-checked against alpha = max|x| with quant.py's quantizer, and max|x| is returned unless the
    winner is strictly better. All-zero (or empty) input gives 0.0.
    """
    levels = grid_levels(bits)
    magnitudes = _finite_magnitudes(values)
    alpha_max = float(magnitudes.max()) if magnitudes.size else 0.0
    if alpha_max == 0.0:
        return 0.0
    sample = _SortedMagnitudes(np.sort(magnitudes))
    best = _sweep_and_zoom(sample, levels, alpha_max, candidates)
    if best < alpha_max and quantization_mse(values, bits, best) < quantization_mse(values, bits, alpha_max):
        return best
    return alpha_max


def mse_threshold_histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    bits: int,
    symmetric: bool = True,
    candidates: int = DEFAULT_MSE_CANDIDATES,
) -> float:
    """The MSE criterion of ``mse_threshold_exact`` on a histogram (activations, paper eq. 9).

    ``counts``/``edges`` as from ``np.histogram``: edges start at 0 and bin centres stand for the
    values. ``symmetric=True``: a histogram of |x| for the symmetric grid. ``symmetric=False``: a
    histogram of non-negative x (e.g. after ReLU) for the unsigned grid of 2^k - 1 steps over
    [0, alpha] (uint8 with zero point 0). The range searched is (0, upper edge of the last
    non-empty bin], which is also what is returned when nothing beats it. An empty histogram
    gives 0.0.
    """
    levels = grid_levels(bits, symmetric)
    counts, edges = _check_magnitude_histogram(counts, edges)
    alpha_max = _histogram_max(counts, edges)
    if alpha_max == 0.0:
        return 0.0
    nonempty = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2.0)[nonempty]
    sample = _SortedMagnitudes(centres, counts[nonempty])
    best = _sweep_and_zoom(sample, levels, alpha_max, candidates)

    def mse(alpha):
        return histogram_mse(counts, edges, bits, alpha, symmetric)

    return best if best < alpha_max and mse(best) < mse(alpha_max) else alpha_max


# --------------------------------------------------------------------------------------------
# ACIQ
# --------------------------------------------------------------------------------------------


def aciq_threshold_from_stats(
    mean: float,
    std: float,
    mean_abs_dev: float,
    max_abs: float,
    bits: int,
    mse_of: Callable[[float], float],
) -> float:
    """ACIQ from summary statistics; ``mse_of(alpha)`` measures the MSE on the actual data.

    The Gaussian fit gives ``|mean| + c_G * std`` and the Laplace fit ``|mean| + c_L * mean_abs_dev``
    (``mean_abs_dev`` = mean |x - mean|, the maximum-likelihood b of a Laplace around the mean);
    ``|mean|`` is added because the grid is centred on zero, not on the mean, so it must reach
    |mean| + (the fitted half-width) on the far side. For zero-mean data this is exactly ACIQ.
    Both are capped at ``max_abs``. Of {max_abs, Gaussian, Laplace}, the one with the lowest
    ``mse_of`` wins, ties going to that order: unlike the original ACIQ, no clipping is kept when
    neither fit improves on it, so ACIQ is never worse than "none" on the data it is given.
    """
    bits = quant.check_bits(bits)
    max_abs = float(max_abs)
    if not max_abs > 0:
        return 0.0
    offset = abs(float(mean))
    fitted = (
        offset + ACIQ_GAUSSIAN_ALPHA[bits] * float(std),
        offset + ACIQ_LAPLACE_ALPHA[bits] * float(mean_abs_dev),
    )
    best_alpha, best_mse = max_abs, mse_of(max_abs)
    for alpha in fitted:
        alpha = min(alpha, max_abs)
        if alpha > 0 and alpha != best_alpha:
            error = mse_of(alpha)
            if error < best_mse:
                best_alpha, best_mse = alpha, error
    return float(best_alpha)


def aciq_threshold(values: np.ndarray, bits: int) -> float:
    """ACIQ on exact values (weights): fits on the values, MSE measured on the values too."""
    x = np.asarray(values, dtype=np.float64).ravel()
    magnitudes = _finite_magnitudes(x)
    if magnitudes.size == 0:
        return 0.0
    mean = float(x.mean())
    return aciq_threshold_from_stats(
        mean=mean,
        std=float(x.std()),
        mean_abs_dev=float(np.mean(np.abs(x - mean))),
        max_abs=float(magnitudes.max()),
        bits=bits,
        mse_of=lambda alpha: quantization_mse(x, bits, alpha),
    )


def aciq_threshold_histogram(counts: np.ndarray, edges: np.ndarray, bits: int) -> float:
    """ACIQ on a histogram of |x|, assuming x symmetric around 0 (the sign is not in the histogram).

    With mean 0: std^2 = E[x^2] = E[|x|^2] and b = E|x|, from the bin centres; the MSE of each
    candidate is ``histogram_mse``. For one-sided data (e.g. after ReLU) compute the statistics
    yourself and call ``aciq_threshold_from_stats``.
    """
    counts, edges = _check_magnitude_histogram(counts, edges)
    total = counts.sum()
    if total == 0:
        return 0.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    return aciq_threshold_from_stats(
        mean=0.0,
        std=float(np.sqrt(np.sum(counts * centres**2) / total)),
        mean_abs_dev=float(np.sum(counts * centres) / total),
        max_abs=_histogram_max(counts, edges),
        bits=bits,
        mse_of=lambda alpha: histogram_mse(counts, edges, bits, alpha),
    )


# --------------------------------------------------------------------------------------------
# KL divergence (TensorRT entropy calibration, MXNet's algorithm)
# --------------------------------------------------------------------------------------------


def _smooth_distribution(dist: np.ndarray, eps: float = KL_SMOOTHING_EPS) -> np.ndarray | None:
    """MXNet's smoothing: zero bins get ``eps``, taken evenly off the non-zero bins.

    Returns None where MXNet raises or asserts (all bins zero, or the smoothing would make a bin
    non-positive); that candidate then gets an infinite divergence, as MXNet's C++ version does.
    """
    nonzero = dist != 0
    n_nonzero = int(np.count_nonzero(nonzero))
    if n_nonzero == 0:
        return None
    eps1 = eps * (dist.size - n_nonzero) / n_nonzero
    smoothed = np.where(nonzero, dist - eps1, eps)
    if eps1 >= 1.0 or smoothed.min() <= 0:
        return None
    return smoothed


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p/P || q/Q) of two positive distributions with totals P and Q (scipy.stats.entropy).

    sum (p/P) log((p/P) / (q/Q)) = sum(p log(p/q)) / P + log(Q/P): one pass fewer than
    normalising first, the same value to rounding.
    """
    p_total, q_total = p.sum(), q.sum()
    return float(np.dot(p, np.log(p / q)) / p_total + np.log(q_total / p_total))


def _candidate_divergence(
    hist: np.ndarray, cum_hist: np.ndarray, start: int, stop: int, num_quantized_bins: int
) -> float:
    """MXNet's divergence for the threshold that keeps ``hist[start:stop]``.

    p: the kept bins, with the outliers' counts added to the first and last kept bin. q: the kept
    bins (without the outliers) merged into ``num_quantized_bins`` groups of ``len // nq`` bins (the
    last group takes the remainder), each group's count spread evenly over the group's bins where p
    is non-zero. Both smoothed, then KL(p || q). ``cum_hist`` is [0, cumsum(hist)], which turns
    every sum over a run of bins into one subtraction.
    """
    kept = hist[start:stop]
    p = kept.copy()
    p[0] += cum_hist[start]
    p[-1] += cum_hist[-1] - cum_hist[stop]
    nonzero = p != 0

    bounds = np.arange(num_quantized_bins + 1) * (kept.size // num_quantized_bins)
    bounds[-1] = kept.size
    group_count = np.diff(cum_hist[start + bounds])
    group_nonzero = np.diff(np.concatenate([[0], np.cumsum(nonzero)])[bounds])
    share = np.divide(group_count, group_nonzero, out=np.zeros_like(group_count), where=group_nonzero > 0)
    q = np.repeat(share, np.diff(bounds)) * nonzero

    p_smooth, q_smooth = _smooth_distribution(p), _smooth_distribution(q)
    if p_smooth is None or q_smooth is None:
        return float("inf")
    return _kl_divergence(p_smooth, q_smooth)


def _symmetric_layout(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The histogram as MXNet sees it: bins of x, symmetric around 0.

    Returns (hist, hist_edges, lo, hi): the candidate keeping ``i`` more bins on each side of the
    middle is ``hist[lo - i : hi + i]``, with threshold ``|hist_edges[hi + i]|``.

    * A histogram of |x| (first edge 0, n bins) is mirrored into 2n bins over -edges..edges; the
      middle is the edge at 0 (lo = hi = n). Each side keeps the full counts: KL normalises, only
      MXNet's absolute smoothing eps sees the factor 2.
    * A histogram of x over [-t, t] with an odd number of bins is MXNet's own layout: the middle
      bin straddles 0 and is always kept (lo = m, hi = m + 1). With an even number of bins the
      middle edge is 0 (lo = hi = n).
    """
    if edges[0] == 0.0:
        n = counts.size
        return np.concatenate([counts[::-1], counts]), np.concatenate([-edges[::-1], edges[1:]]), n, n
    if edges[0] > 0 or not np.isclose(edges[0], -edges[-1], rtol=1e-5, atol=1e-7):
        raise ValueError("kl_threshold needs a histogram of |x| (edges from 0) or of x over [-t, t]")
    middle = counts.size // 2
    tolerance = 1e-5 * (edges[-1] - edges[0]) / counts.size  # a small fraction of a bin
    if counts.size % 2:
        if abs(edges[middle] + edges[middle + 1]) > tolerance:
            raise ValueError("the middle bin of a symmetric histogram must be centred on 0")
        return counts, edges, middle, middle + 1
    if abs(edges[middle]) > tolerance:
        raise ValueError("the middle edge of a symmetric histogram with an even number of bins must be 0")
    return counts, edges, middle, middle


def kl_divergences(
    counts: np.ndarray, edges: np.ndarray, bits: int, unsigned: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, divergences) of every candidate of ``kl_threshold``, smallest threshold first."""
    counts, edges = _check_histogram(counts, edges)
    hist, hist_edges, lo, hi = _symmetric_layout(counts, edges)
    # An unsigned grid puts all its 2^k - 1 steps on [0, t]: over [-t, t] that is 2^(k+1) - 1.
    num_quantized_bins = 2 ** (quant.check_bits(bits) + int(unsigned)) - 1
    halves = np.arange(_narrowest_candidate(lo, hi, num_quantized_bins), _widest_candidate(hist, lo, hi) + 1)
    cum_hist = np.concatenate([[0.0], np.cumsum(hist)])
    divergences = [_candidate_divergence(hist, cum_hist, lo - i, hi + i, num_quantized_bins) for i in halves]
    return np.abs(hist_edges[hi + halves]), np.array(divergences, dtype=np.float64)


def _narrowest_candidate(lo: int, hi: int, num_quantized_bins: int) -> int:
    """Fewest bins a side that keep at least ``num_quantized_bins`` bins (MXNet starts there)."""
    return max(1, -(-(num_quantized_bins - (hi - lo)) // 2))


def _widest_candidate(hist: np.ndarray, lo: int, hi: int) -> int:
    """Bins a side up to the last non-empty bin of either sign: wider thresholds clip nothing."""
    nonempty = np.flatnonzero(hist)
    if nonempty.size == 0:
        return 0
    return int(max(lo - nonempty[0], nonempty[-1] + 1 - hi, 0))


def kl_threshold(counts: np.ndarray, edges: np.ndarray, bits: int, unsigned: bool = False) -> float:
    """TensorRT/MXNet entropy calibration: the candidate threshold of minimum KL(p || q).

    ``counts``/``edges`` (as from ``np.histogram``) are either a histogram of |x| (edges from 0,
    mirrored around 0 as described in ``_symmetric_layout``) or MXNet's histogram of x over
    [-t, t] (e.g. 8001 bins). Candidates grow from the middle one bin a side at a time, from the
    narrowest that keeps at least 2^k - 1 bins up to the last non-empty bin (so never beyond the
    data's max|x|); ties go to the smaller threshold, as ``np.argmin`` does in MXNet. A histogram
    too coarse (or too sparse) to have any candidate gives its full range, the upper edge of the
    last non-empty bin; an empty one gives 0.0.

    Deviations from MXNet, none of which changes the result on ordinary histograms: float64
    throughout (MXNet smooths in float32); a candidate whose smoothing fails gets an infinite
    divergence instead of an assertion error; candidates past the last non-empty bin are skipped.
    """
    thresholds, divergences = kl_divergences(counts, edges, bits, unsigned)
    if thresholds.size == 0 or not np.isfinite(divergences).any():
        counts, edges = _check_histogram(counts, edges)
        hist, hist_edges, lo, hi = _symmetric_layout(counts, edges)
        if not hist.any():
            return 0.0
        return float(abs(hist_edges[hi + _widest_candidate(hist, lo, hi)]))
    return float(thresholds[int(np.argmin(divergences))])


# --------------------------------------------------------------------------------------------
# Percentile
# --------------------------------------------------------------------------------------------


def _check_percentile(percentile: float) -> float:
    percentile = float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
    return percentile


def percentile_threshold(values: np.ndarray, percentile: float = 99.99) -> float:
    """``np.percentile(np.abs(x), percentile)`` (linear interpolation); 0.0 for empty input."""
    percentile = _check_percentile(percentile)
    magnitudes = _finite_magnitudes(values)
    if magnitudes.size == 0:
        return 0.0
    return float(np.percentile(magnitudes, percentile))


def percentile_threshold_histogram(counts: np.ndarray, edges: np.ndarray, percentile: float = 99.99) -> float:
    """The percentile of |x| from a histogram of |x|, interpolated within the bin.

    The c values of a bin are taken to sit evenly across it (at the centres of c equal slices),
    and numpy's rule is applied to those reconstructed values: rank r = p/100 * (N - 1), linear
    interpolation between the order statistics floor(r) and floor(r) + 1. Every reconstructed
    value lies in the bin of the value it stands for, so the result is within one bin width of
    ``np.percentile`` on the data. Counts are rounded to whole values.
    """
    percentile = _check_percentile(percentile)
    counts, edges = _check_magnitude_histogram(counts, edges)
    counts = np.rint(counts)
    total = int(counts.sum())
    if total == 0:
        return 0.0
    cumulative = np.cumsum(counts)

    def order_statistic(rank: int) -> float:
        b = int(np.searchsorted(cumulative, rank, side="right"))  # bin holding the rank-th value
        before = cumulative[b] - counts[b]
        return float(edges[b] + (rank - before + 0.5) / counts[b] * (edges[b + 1] - edges[b]))

    rank = percentile / 100.0 * (total - 1)
    low = int(np.floor(rank))
    value = order_statistic(low)
    if low + 1 < total and rank > low:
        value += (rank - low) * (order_statistic(low + 1) - value)
    return value


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def weight_clip_threshold(values: np.ndarray, method: str, bits: int, percentile: float = 99.99) -> float:
    """Clip threshold of a weight tensor (all values known) by ``method``, one of ``CLIP_METHODS``.

    "kl" runs ``kl_threshold`` on a ``KL_WEIGHT_HISTOGRAM_BINS``-bin histogram of |w| over
    [0, max|w|]; "percentile" falls back to max|w| when the percentile is 0 (mostly-zero weights).
    The result is 0.0 only for all-zero (or empty) weights.
    """
    if method not in CLIP_METHODS:
        raise ValueError(f"unknown clip method {method!r}; expected one of {', '.join(CLIP_METHODS)}")
    bits = quant.check_bits(bits)
    magnitudes = _finite_magnitudes(values)
    alpha_max = float(magnitudes.max()) if magnitudes.size else 0.0
    if alpha_max == 0.0:
        return 0.0
    if method == "none":
        return alpha_max
    if method == "mse":
        return mse_threshold_exact(values, bits)
    if method == "aciq":
        return aciq_threshold(values, bits)
    if method == "kl":
        counts, edges = np.histogram(magnitudes, bins=KL_WEIGHT_HISTOGRAM_BINS, range=(0.0, alpha_max))
        return min(kl_threshold(counts, edges, bits), alpha_max)
    # a low percentile of mostly-zero (e.g. pruned) weights is 0, which would leave no grid at all
    return percentile_threshold(magnitudes, percentile) or alpha_max

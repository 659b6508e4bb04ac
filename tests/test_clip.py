"""Clip thresholds (paper sec. 4): MSE, ACIQ, KL, percentile, checked on plain arrays.

The references here are deliberately naive and independent of ocs_onnx.clip: brute-force sweeps
of the empirical MSE, a loop-for-loop transcription of MXNet's KL calibration, and a scipy
recomputation of the ACIQ constants.
"""

from __future__ import annotations

import numpy as np
import pytest

from ocs_onnx import clip, quant

SAMPLE_SIZE = 1_000_000
OPTIMUM_TOLERANCE = 0.05  # how far (relative) an MSE-minimising method may land from the brute-force optimum


# --------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------


def empirical_mse(x: np.ndarray, bits: int, alpha: float) -> float:
    """mean (x - Q(x))^2, written out: scale = alpha/qmax, round half up, clamp to +-qmax."""
    qmax = 2 ** (bits - 1) - 1
    scale = alpha / qmax
    return float(np.mean((x - scale * np.clip(np.floor(x / scale + 0.5), -qmax, qmax)) ** 2))


def brute_force_minimum(mse_of, top: float) -> float:
    """Dense sweep of alpha over (0, top]: 40 even steps, then 40 steps across the best two.

    The curve is smooth on large samples, so the coarse sweep cannot miss the basin; the fine
    sweep resolves alpha to top / 800 (< 0.2 % of the optimum for the samples here).
    """
    coarse = top * np.arange(1, 41) / 40
    centre = coarse[int(np.argmin([mse_of(a) for a in coarse]))]
    fine = np.linspace(centre - top / 40, centre + top / 40, 41)
    fine = fine[(fine > 0) & (fine <= top)]
    return float(fine[int(np.argmin([mse_of(a) for a in fine]))])


def brute_force_optimal_alpha(x: np.ndarray, bits: int) -> float:
    """The empirical-MSE optimum of the symmetric grid. Runs on |x|, which gives the same MSE (x
    and -x are the same distance from their levels) in half the time."""
    magnitudes = np.abs(x)
    return brute_force_minimum(lambda alpha: empirical_mse(magnitudes, bits, alpha), float(magnitudes.max()))


def abs_histogram(x: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    magnitudes = np.abs(x)
    return np.histogram(magnitudes, bins=bins, range=(0.0, float(magnitudes.max())))


SAMPLERS = {
    "gaussian": lambda rng: rng.standard_normal(SAMPLE_SIZE),
    "laplace": lambda rng: rng.laplace(size=SAMPLE_SIZE),
}


@pytest.fixture(scope="module")
def samples():
    return {name: draw(np.random.default_rng(2019)) for name, draw in SAMPLERS.items()}


@pytest.fixture(scope="module")
def optimal_alpha(samples):
    """Brute-force optimum per (distribution, bits), computed once for all methods."""
    cache = {}

    def get(name: str, bits: int) -> float:
        if (name, bits) not in cache:
            cache[name, bits] = brute_force_optimal_alpha(samples[name], bits)
        return cache[name, bits]

    return get


# --------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------


def test_grid_levels_follow_quant_symmetric_and_unsigned_grids():
    assert [clip.grid_levels(k) for k in range(2, 9)] == [quant.symmetric_qmax(k) for k in range(2, 9)]
    assert [clip.grid_levels(k, symmetric=False) for k in range(2, 9)] == [3, 7, 15, 31, 63, 127, 255]


def test_quantization_mse_is_the_mse_of_quant_fake_quantizer():
    x = np.random.default_rng(0).standard_normal(1000)
    alpha = 1.7
    expected = np.mean((x - quant.fake_quantize_symmetric(x, quant.symmetric_scale(alpha, 4), 4)) ** 2)
    assert clip.quantization_mse(x, 4, alpha) == pytest.approx(expected, rel=1e-12)
    assert clip.quantization_mse(x, 4, alpha) == pytest.approx(empirical_mse(x, 4, alpha), rel=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fast_mse_evaluation_from_sorted_magnitudes_agrees_with_the_quantizer(bits):
    """The MSE search evaluates candidates from prefix sums; it must agree with quant.py's grid."""
    x = np.random.default_rng(bits).laplace(size=50_000)
    fast = clip._SortedMagnitudes(np.sort(np.abs(x)))
    alphas = np.array([0.3, 1.0, 2.5, 6.0, float(np.abs(x).max())])
    expected = [clip.quantization_mse(x, bits, a) for a in alphas]
    np.testing.assert_allclose(fast.squared_errors(alphas, quant.symmetric_qmax(bits)) / x.size, expected, rtol=1e-8)


# --------------------------------------------------------------------------------------------
# Near the numerical optimum on large Gaussian and Laplace samples
# --------------------------------------------------------------------------------------------


def _method_thresholds(x: np.ndarray, bits: int) -> dict[str, float]:
    counts, edges = abs_histogram(x)
    return {
        "mse_threshold_exact": clip.mse_threshold_exact(x, bits),
        "mse_threshold_histogram": clip.mse_threshold_histogram(counts, edges, bits),
        "aciq_threshold": clip.aciq_threshold(x, bits),
        "aciq_threshold_histogram": clip.aciq_threshold_histogram(counts, edges, bits),
    }


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("distribution", sorted(SAMPLERS))
def test_mse_and_aciq_thresholds_are_within_5_percent_of_the_brute_force_optimum(
    samples, optimal_alpha, distribution, bits
):
    x = samples[distribution]
    best = optimal_alpha(distribution, bits)
    for method, alpha in _method_thresholds(x, bits).items():
        assert abs(alpha / best - 1) < OPTIMUM_TOLERANCE, (method, alpha, best)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_exact_mse_threshold_matches_the_brute_force_optimum_to_its_resolution(samples, optimal_alpha, bits):
    """Both minimise the same function; only the sweep resolution (max|x| / 800) separates them."""
    x = samples["laplace"]
    alpha = clip.mse_threshold_exact(x, bits)
    best = optimal_alpha("laplace", bits)
    assert abs(alpha - best) <= float(np.abs(x).max()) / 800
    assert empirical_mse(x, bits, alpha) <= empirical_mse(x, bits, best) * (1 + 1e-9)


def test_aciq_picks_the_gaussian_fit_for_gaussian_data_and_the_laplace_fit_for_laplace_data(samples):
    gaussian, laplace = samples["gaussian"], samples["laplace"]
    assert clip.aciq_threshold(gaussian, 6) == pytest.approx(
        abs(gaussian.mean()) + clip.ACIQ_GAUSSIAN_ALPHA[6] * gaussian.std(), rel=1e-12
    )
    b = np.mean(np.abs(laplace - laplace.mean()))
    assert clip.aciq_threshold(laplace, 6) == pytest.approx(abs(laplace.mean()) + clip.ACIQ_LAPLACE_ALPHA[6] * b)


def test_unsigned_histogram_mse_is_near_the_brute_force_optimum_for_relu_data():
    """symmetric=False: a histogram of x >= 0 and the unsigned grid of 2^k - 1 steps over [0, alpha]."""
    x = np.maximum(np.random.default_rng(3).standard_normal(200_000), 0.0)
    bits, levels = 4, 15
    top = float(x.max())

    def mse(alpha):
        scale = alpha / levels
        return np.mean((x - scale * np.clip(np.floor(x / scale + 0.5), 0, levels)) ** 2)

    best = brute_force_minimum(mse, top)
    counts, edges = np.histogram(x, bins=2048, range=(0.0, top))
    alpha = clip.mse_threshold_histogram(counts, edges, bits, symmetric=False)
    assert abs(alpha / best - 1) < OPTIMUM_TOLERANCE
    # the unsigned grid has twice the levels of the symmetric one, so it clips further out
    assert alpha > clip.mse_threshold_histogram(counts, edges, bits, symmetric=True)


# --------------------------------------------------------------------------------------------
# Never worse than no clipping
# --------------------------------------------------------------------------------------------


def _assorted_tensors():
    rng = np.random.default_rng(11)
    yield "gaussian", rng.standard_normal(5000)
    yield "laplace", rng.laplace(size=5000).astype(np.float32)
    yield "uniform", rng.uniform(-1, 1, size=5000)
    yield "shifted", rng.standard_normal(3000) + 4.0
    yield "one outlier", np.append(rng.standard_normal(999) * 0.01, 3.0)
    yield "tiny", np.array([0.2, -0.7, 1.3])
    yield "on the grid", np.arange(-7, 8) / 7.0  # already exact on the 4-bit grid with alpha = 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_mse_and_aciq_are_never_worse_than_no_clipping(bits):
    for name, x in _assorted_tensors():
        top = float(np.abs(x).max())
        no_clip = empirical_mse(x.astype(np.float64), bits, top)
        for method in ("mse", "aciq"):
            alpha = clip.weight_clip_threshold(x, method, bits)
            assert empirical_mse(x.astype(np.float64), bits, alpha) <= no_clip, (name, method)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_histogram_mse_and_aciq_are_never_worse_than_no_clipping_on_the_histogram(bits):
    for name, x in _assorted_tensors():
        counts, edges = abs_histogram(x, bins=256)
        top = float(edges[-1])
        no_clip = clip.histogram_mse(counts, edges, bits, top)
        for alpha in (
            clip.mse_threshold_histogram(counts, edges, bits),
            clip.aciq_threshold_histogram(counts, edges, bits),
        ):
            assert 0 < alpha <= top
            assert clip.histogram_mse(counts, edges, bits, alpha) <= no_clip, name


def test_values_already_on_the_grid_keep_alpha_max():
    x = np.arange(-7, 8) / 7.0 * 2.5
    assert clip.mse_threshold_exact(x, 4) == 2.5


def test_aciq_from_stats_keeps_no_clipping_when_neither_fit_is_better():
    alpha = clip.aciq_threshold_from_stats(
        mean=0.0, std=1.0, mean_abs_dev=0.8, max_abs=5.0, bits=4, mse_of=lambda a: 1.0 if a == 5.0 else 2.0
    )
    assert alpha == 5.0


def test_aciq_from_stats_offsets_by_the_mean_and_caps_at_max_abs():
    def mse_of(alpha):
        return abs(alpha - 3.0)  # prefers whichever candidate is nearest 3

    gaussian = 0.5 + clip.ACIQ_GAUSSIAN_ALPHA[4] * 1.0
    assert clip.aciq_threshold_from_stats(0.5, 1.0, 10.0, 100.0, 4, mse_of) == pytest.approx(gaussian)
    assert clip.aciq_threshold_from_stats(-0.5, 1.0, 10.0, 2.0, 4, mse_of) == 2.0


# --------------------------------------------------------------------------------------------
# ACIQ constants, recomputed
# --------------------------------------------------------------------------------------------


def _gauss_legendre(lo: np.ndarray, hi: np.ndarray, integrand, nodes: int = 24) -> np.ndarray:
    """Integrals over many [lo, hi] at once. Exact enough for smooth integrands on short cells, and
    free of the cancellation that closed forms suffer on narrow cells."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    half = (hi - lo)[:, None] / 2
    x = (lo + hi)[:, None] / 2 + half * t
    return np.sum(w * integrand(x) * half, axis=1)


def expected_mse(alpha: float, bits: int, distribution: str) -> float:
    """E[(X - Q(X))^2] for a unit Gaussian or unit Laplace: cells by quadrature, tail in closed form."""
    from scipy import special

    qmax = 2 ** (bits - 1) - 1
    step = alpha / qmax
    levels = np.arange(qmax) * step
    lo, hi = np.maximum(levels - step / 2, 0.0), levels + step / 2
    u = alpha - step / 2  # everything from here up is rounded or clipped to alpha
    if distribution == "gaussian":
        pdf = lambda x: np.exp(-(x**2) / 2) / np.sqrt(2 * np.pi)  # noqa: E731
        tail = (1 + alpha**2) * special.ndtr(-u) + (u - 2 * alpha) * pdf(u)
    else:
        pdf = lambda x: np.exp(-x) / 2  # noqa: E731
        tail = np.exp(-u) / 2 * ((u - alpha) ** 2 + 2 * (u - alpha) + 2)
    cell_index = np.arange(qmax)
    cells = _gauss_legendre(lo, hi, lambda x: (x - levels[cell_index][:, None]) ** 2 * pdf(x))
    return float(2 * (cells.sum() + tail))  # both signs


def recompute_aciq_alpha(bits: int, distribution: str) -> float:
    from scipy import optimize

    scan = np.linspace(0.05, 8.0 if distribution == "gaussian" else 20.0, 120)
    i = int(np.argmin([expected_mse(a, bits, distribution) for a in scan]))
    result = optimize.minimize_scalar(
        expected_mse,
        bounds=(scan[max(i - 1, 0)], scan[min(i + 1, scan.size - 1)]),
        args=(bits, distribution),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(result.x)


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_aciq_constants_minimise_the_expected_mse_of_the_2_to_the_k_minus_1_grid(distribution):
    pytest.importorskip("scipy")
    table = clip.ACIQ_GAUSSIAN_ALPHA if distribution == "gaussian" else clip.ACIQ_LAPLACE_ALPHA
    assert sorted(table) == list(range(2, 9))
    for bits, constant in table.items():
        assert recompute_aciq_alpha(bits, distribution) == pytest.approx(constant, abs=2e-6), bits


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_expected_mse_used_for_the_constants_matches_a_monte_carlo_estimate(distribution):
    """Ties the derivation to quant.py's grid: the integral equals the sample MSE of the quantizer."""
    pytest.importorskip("scipy")
    x = SAMPLERS[distribution](np.random.default_rng(5))
    for bits in (2, 4):
        alpha = 1.5 if distribution == "gaussian" else 3.0
        assert clip.quantization_mse(x, bits, alpha) == pytest.approx(expected_mse(alpha, bits, distribution), rel=0.02)


# --------------------------------------------------------------------------------------------
# KL divergence: a loop-for-loop MXNet reference
# --------------------------------------------------------------------------------------------


def reference_smooth_distribution(p, eps=0.0001):
    """MXNet's _smooth_distribution, written as loops; None where MXNet would raise/assert."""
    n_zeros = sum(1 for v in p if v == 0)
    n_nonzeros = len(p) - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    smoothed = [v + eps if v == 0 else v - eps1 for v in p]
    if eps1 >= 1.0 or min(smoothed) <= 0:
        return None
    return smoothed


def reference_kl_threshold(hist, edges, num_quantized_bins):
    """MXNet's _get_optimal_threshold on a histogram of x symmetric around 0.

    Odd number of bins: MXNet's layout exactly (middle bin straddles 0, slice of 2i + 1 bins).
    Even number of bins (a mirrored histogram of |x|): the same with slices of 2i bins.
    Returns (thresholds, divergences), every candidate in order.
    """
    from scipy import stats

    num_bins = len(hist)
    middle = num_bins // 2
    extra = num_bins % 2  # the straddling middle bin
    first_i = (num_quantized_bins - extra + 1) // 2
    thresholds, divergences = [], []
    for i in range(first_i, middle + 1):
        start, stop = middle - i, middle + i + extra
        thresholds.append(abs(edges[stop]))
        sliced = [float(v) for v in hist[start:stop]]
        p = list(sliced)
        p[0] += float(sum(hist[:start]))
        p[-1] += float(sum(hist[stop:]))
        is_nonzero = [1 if v != 0 else 0 for v in p]
        merged = len(sliced) // num_quantized_bins
        quantized = [sum(sliced[j * merged : (j + 1) * merged]) for j in range(num_quantized_bins)]
        quantized[-1] += sum(sliced[num_quantized_bins * merged :])
        q = [0.0] * len(sliced)
        for j in range(num_quantized_bins):
            lo = j * merged
            hi = len(sliced) if j == num_quantized_bins - 1 else lo + merged
            norm = sum(is_nonzero[lo:hi])
            if norm != 0:
                for k in range(lo, hi):
                    q[k] = quantized[j] / norm
        q = [0.0 if p[k] == 0 else q[k] for k in range(len(q))]
        p_smooth, q_smooth = reference_smooth_distribution(p), reference_smooth_distribution(q)
        if p_smooth is None or q_smooth is None:
            divergences.append(float("inf"))
        else:
            divergences.append(float(stats.entropy(p_smooth, q_smooth)))
    return np.array(thresholds), np.array(divergences)


@pytest.fixture(scope="module")
def laplace_for_kl():
    return np.random.default_rng(7).laplace(size=100_000)


@pytest.mark.parametrize("bits", [8, 6])
def test_kl_threshold_equals_the_mxnet_reference_on_mxnets_symmetric_histogram(laplace_for_kl, bits):
    pytest.importorskip("scipy")
    x = laplace_for_kl
    top = float(np.abs(x).max())
    hist, edges = np.histogram(x, bins=601, range=(-top, top))  # MXNet's layout (it uses 8001 bins)
    thresholds, divergences = reference_kl_threshold(hist, edges, 2**bits - 1)
    got_thresholds, got_divergences = clip.kl_divergences(hist, edges, bits)
    np.testing.assert_array_equal(got_thresholds, thresholds)
    np.testing.assert_allclose(got_divergences, divergences, rtol=1e-9)
    assert clip.kl_threshold(hist, edges, bits) == thresholds[int(np.argmin(divergences))]


@pytest.mark.parametrize("bits", [8, 6])
def test_kl_threshold_on_a_histogram_of_abs_x_equals_the_reference_on_its_mirror(laplace_for_kl, bits):
    pytest.importorskip("scipy")
    counts, edges = abs_histogram(laplace_for_kl, bins=300)
    mirrored = np.concatenate([counts[::-1], counts])
    mirrored_edges = np.concatenate([-edges[::-1], edges[1:]])
    thresholds, divergences = reference_kl_threshold(mirrored, mirrored_edges, 2**bits - 1)
    assert clip.kl_threshold(counts, edges, bits) == thresholds[int(np.argmin(divergences))]


def test_kl_clips_a_laplace_sample_and_stays_inside_its_range(laplace_for_kl):
    counts, edges = abs_histogram(laplace_for_kl)
    top = float(edges[-1])
    for bits in (2, 5, 8):
        alpha = clip.kl_threshold(counts, edges, bits)
        assert 0 < alpha < top, bits


def test_kl_weight_method_uses_a_2048_bin_histogram_of_abs_w():
    w = np.random.default_rng(9).standard_normal(20_000).astype(np.float32)
    counts, edges = np.histogram(np.abs(w), bins=2048, range=(0.0, float(np.abs(w).max())))
    assert clip.weight_clip_threshold(w, "kl", 6) == clip.kl_threshold(counts, edges, 6)


def test_kl_refuses_a_histogram_that_is_neither_of_abs_x_nor_symmetric():
    with pytest.raises(ValueError):
        clip.kl_threshold(np.ones(4), np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 4)
    with pytest.raises(ValueError):
        clip.kl_threshold(np.ones(4), np.array([-1.0, 0.0, 1.0, 2.0, 3.0]), 4)


# --------------------------------------------------------------------------------------------
# Percentile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [0.0, 50.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_threshold_is_exactly_numpys_percentile_of_abs_x(percentile):
    for x in (
        np.random.default_rng(1).laplace(size=12345),
        np.random.default_rng(2).standard_normal((64, 3, 3)).astype(np.float32),
    ):
        assert clip.percentile_threshold(x, percentile) == float(np.percentile(np.abs(x), percentile))


@pytest.mark.parametrize("bins", [16, 100, 2048])
@pytest.mark.parametrize("percentile", [0.0, 10.0, 50.0, 99.0, 99.9, 99.99, 100.0])
def test_histogram_percentile_is_within_one_bin_width_of_numpy(bins, percentile):
    x = np.random.default_rng(4).laplace(size=30_000)
    counts, edges = abs_histogram(x, bins=bins)
    got = clip.percentile_threshold_histogram(counts, edges, percentile)
    assert abs(got - np.percentile(np.abs(x), percentile)) <= edges[1] - edges[0]


def test_percentile_default_is_99_99():
    x = np.random.default_rng(6).standard_normal(100_000)
    assert clip.weight_clip_threshold(x, "percentile", 8) == float(np.percentile(np.abs(x), 99.99))
    assert clip.weight_clip_threshold(x, "percentile", 8, percentile=99.9) == float(np.percentile(np.abs(x), 99.9))


# --------------------------------------------------------------------------------------------
# Edge cases and the dispatcher
# --------------------------------------------------------------------------------------------


def test_clip_methods_are_the_five_the_compiler_offers():
    assert clip.CLIP_METHODS == ("none", "mse", "aciq", "kl", "percentile")


@pytest.mark.parametrize("method", clip.CLIP_METHODS)
def test_all_zero_and_empty_weights_get_threshold_zero(method):
    assert clip.weight_clip_threshold(np.zeros((4, 3)), method, 8) == 0.0
    assert clip.weight_clip_threshold(np.zeros(0), method, 8) == 0.0


def test_empty_histograms_get_threshold_zero():
    counts, edges = np.zeros(10), np.linspace(0, 1, 11)
    assert clip.mse_threshold_histogram(counts, edges, 8) == 0.0
    assert clip.aciq_threshold_histogram(counts, edges, 8) == 0.0
    assert clip.kl_threshold(counts, edges, 8) == 0.0
    assert clip.percentile_threshold_histogram(counts, edges, 99.0) == 0.0


@pytest.mark.parametrize("method", clip.CLIP_METHODS)
@pytest.mark.parametrize(
    "values, bits",
    [([0.37], 2), ([-2.5], 8), ([1.25] * 40, 4), ([-0.5] * 7, 6)],
    ids=["single", "single negative", "constant", "constant negative"],
)
def test_a_single_or_constant_value_keeps_its_magnitude(method, values, bits):
    alpha = clip.weight_clip_threshold(np.array(values, dtype=np.float32), method, bits)
    assert alpha == pytest.approx(abs(values[0]))


@pytest.mark.parametrize("method", clip.CLIP_METHODS)
def test_thresholds_are_positive_and_never_exceed_max_abs(method):
    rng = np.random.default_rng(12)
    draws = (rng.standard_normal, lambda n: rng.laplace(size=n) * 1e-3, lambda n: rng.uniform(0, 5, n))
    # every bit width comes up once or more across the (size, draw) pairs; KL takes ~0.2 s a call
    cases = [(size, draw) for size in (1, 3, 257) for draw in draws]
    for case, (size, draw) in enumerate(cases):
        x, bits = draw(size), 2 + case % 7
        alpha = clip.weight_clip_threshold(x, method, bits)
        assert 0 < alpha <= float(np.abs(x).max()), (size, bits)


def test_kl_on_a_histogram_too_coarse_for_the_grid_gives_the_full_range():
    counts, edges = np.array([5.0, 3.0, 1.0, 0.0]), np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert clip.kl_threshold(counts, edges, 8) == 3.0  # upper edge of the last non-empty bin


def test_percentile_of_mostly_zero_weights_falls_back_to_max_abs():
    w = np.concatenate([np.zeros(90), np.linspace(-1.0, 1.0, 10)])
    assert clip.percentile_threshold(w, 50.0) == 0.0  # numpy's answer, kept by the plain function
    assert clip.weight_clip_threshold(w, "percentile", 8, percentile=50.0) == 1.0


def test_unknown_method_bad_bits_and_nan_are_refused():
    x = np.ones(3)
    with pytest.raises(ValueError, match="unknown clip method"):
        clip.weight_clip_threshold(x, "max", 8)
    with pytest.raises(ValueError):
        clip.weight_clip_threshold(x, "mse", 9)
    with pytest.raises(ValueError, match="NaN"):
        clip.mse_threshold_exact(np.array([1.0, np.nan]), 8)
    with pytest.raises(ValueError):
        clip.percentile_threshold(x, 101.0)
    with pytest.raises(ValueError, match="start at 0"):
        clip.mse_threshold_histogram(np.ones(2), np.array([-1.0, 0.0, 1.0]), 8)


def test_kl_on_an_unsigned_grid_counts_its_levels_over_zero_to_t():
    # 2^k - 1 steps over [0, t] are 2^(k+1) - 1 bins over [-t, t] in the mirrored histogram.
    values = np.abs(np.random.default_rng(11).standard_normal(200000))
    counts, edges = np.histogram(values, bins=1024, range=(0, values.max()))
    for bits in (4, 6, 7):
        assert clip.kl_threshold(counts, edges, bits, unsigned=True) == clip.kl_threshold(counts, edges, bits + 1)

"""Quantization and channel-splitting math on plain numpy arrays.

Every formula of the compiler lives here, with no graph in sight, so each one can be
tested on arrays. The conventions follow the OCS paper (Zhao et al., ICML 2019, sec. 3):

* k-bit symmetric weights: ``qmax = 2**(k-1) - 1`` levels each side of zero,
  ``scale = alpha / qmax`` with ``alpha = max|w|`` (or a clip threshold),
  ``q = clamp(floor(w / scale + 0.5), -qmax, qmax)`` (round half up), zero point 0.
* Quantization-aware split (eq. 6): ``w -> ((w - scale/2) / 2, (w + scale/2) / 2)``, which keeps
  ``Q(a) + Q(b) == Q(w)`` exactly (Hermite's identity). The naive split is ``(w/2, w/2)``.
* Channel selection (sec. 3.4): each split takes the input channel that currently holds the
  largest |w|; a copy made by an earlier split may be split again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"{what} must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    return int(bits)


def symmetric_qmax(bits: int) -> int:
    """Largest level of a k-bit symmetric grid: 2^(k-1) - 1 (the grid has 2^k - 1 points)."""
    return 2 ** (check_bits(bits) - 1) - 1


# --------------------------------------------------------------------------------------------
# Symmetric weight quantization
# --------------------------------------------------------------------------------------------


def reduce_axes(ndim: int, keep_axis: int | None) -> tuple[int, ...]:
    """Axes to reduce over to get one value per slice of ``keep_axis`` (all axes if None)."""
    if keep_axis is None:
        return tuple(range(ndim))
    keep_axis %= ndim
    return tuple(axis for axis in range(ndim) if axis != keep_axis)


def expand_to(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-axis vector (or scalar) so that it broadcasts against an ``ndim`` array."""
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return values.reshape(shape)


def max_abs(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| over the whole tensor (axis None) or per slice along ``axis``."""
    w = np.asarray(w)
    if w.size == 0:
        return np.zeros(() if axis is None else (w.shape[axis],), dtype=np.float64)
    return np.abs(w).max(axis=reduce_axes(w.ndim, axis)).astype(np.float64)


def symmetric_scale(alpha: np.ndarray, bits: int) -> np.ndarray:
    """scale = alpha / qmax, with alpha the clip threshold (max|w| when not clipping).

    A zero range (an all-zero tensor or channel) gets scale 1 so that nothing divides by zero;
    its values quantize to 0 either way.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    scale = alpha / symmetric_qmax(bits)
    return np.where(scale > 0, scale, 1.0)


def quantize_symmetric(w: np.ndarray, scale: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Integer levels of ``w``: clamp(floor(w / scale + 0.5), -qmax, qmax), as int64.

    ``scale`` is a scalar or one value per slice along ``axis``. Computed in float64 so that the
    rounding is the one the formulas promise, not float32's.
    """
    qmax = symmetric_qmax(bits)
    levels = np.array(w, dtype=np.float64)  # a copy, worked on in place (weights can be large)
    s = expand_to(np.asarray(scale, dtype=np.float64), levels.ndim, axis)
    levels = _broadcast_copy(levels, s.shape)
    np.divide(levels, s, out=levels)
    levels += 0.5
    np.floor(levels, out=levels)
    np.clip(levels, -qmax, qmax, out=levels)
    return levels.astype(np.int64)


def _broadcast_copy(values: np.ndarray, *shapes) -> np.ndarray:
    """``values`` with the shape it broadcasts to against ``shapes`` (for in-place arithmetic)."""
    shape = np.broadcast_shapes(values.shape, *shapes)
    return values if shape == values.shape else np.array(np.broadcast_to(values, shape))


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None = None, zero_point=0) -> np.ndarray:
    values = np.array(q, dtype=np.float64)  # a copy, worked on in place
    s = expand_to(np.asarray(scale, dtype=np.float64), values.ndim, axis)
    zp = expand_to(np.asarray(zero_point, dtype=np.float64), values.ndim, axis)
    values = _broadcast_copy(values, s.shape, zp.shape)
    if np.any(zp):
        values -= zp
    values *= s
    return values


def fake_quantize_symmetric(w: np.ndarray, scale: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Q(w) mapped back to real values (what DequantizeLinear gives at run time)."""
    return dequantize(quantize_symmetric(w, scale, bits, axis), scale, axis)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None when undefined (no signal, no noise, or
    values that are not finite)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approximation, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0 or signal == 0.0 or not math.isfinite(noise + signal):  # NaN/Inf values: no ratio
        return None
    return 10.0 * math.log10(signal / noise)


# --------------------------------------------------------------------------------------------
# Asymmetric / symmetric activation parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationQParams:
    """Parameters of one QuantizeLinear/DequantizeLinear pair on an activation."""

    scale: float
    zero_point: int
    dtype: type  # np.uint8 or np.int8


def asymmetric_uint8_qparams(lo: float, hi: float, bits: int) -> ActivationQParams:
    """uint8 grid 0..2^k-1 covering [lo, hi] extended to include 0 (so 0 is exact, as padding needs)."""
    qmax = 2 ** check_bits(bits) - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / qmax
    if not np.float32(scale) > 0:  # also a range so small that its float32 scale would be 0
        return ActivationQParams(1.0, 0, np.uint8)
    zero_point = int(np.clip(np.floor(-lo / scale + 0.5), 0, qmax))
    return ActivationQParams(float(np.float32(scale)), zero_point, np.uint8)


def symmetric_int8_qparams(lo: float, hi: float, bits: int) -> ActivationQParams:
    """int8 grid -qmax..qmax around zero with qmax = 2^(k-1) - 1, zero point 0."""
    alpha = max(abs(float(lo)), abs(float(hi)))
    scale = alpha / symmetric_qmax(bits)
    if not np.float32(scale) > 0:
        return ActivationQParams(1.0, 0, np.int8)
    return ActivationQParams(float(np.float32(scale)), 0, np.int8)


def fake_quantize_activation(x: np.ndarray, qp: ActivationQParams, bits: int) -> np.ndarray:
    """x quantized on the k-bit activation grid of ``qp`` (saturating at the grid's ends) and
    dequantized, with QuantizeLinear's rounding (half to even)."""
    if qp.dtype == np.uint8:
        lo, hi = 0, 2**bits - 1
    else:
        hi = symmetric_qmax(bits)
        lo = -hi
    q = np.clip(np.rint(np.asarray(x, dtype=np.float64) / qp.scale) + qp.zero_point, lo, hi)
    return (q - qp.zero_point) * qp.scale


def histogram_sqnr_db(counts: np.ndarray, edges: np.ndarray, qp: ActivationQParams, bits: int) -> float | None:
    """SQNR of an activation under ``qp``, estimated on its calibration histogram (every value
    taken at its bin's centre)."""
    centres = (edges[:-1] + edges[1:]) / 2
    signal = float(np.sum(counts * centres**2))
    noise = float(np.sum(counts * (centres - fake_quantize_activation(centres, qp, bits)) ** 2))
    if signal == 0.0:
        return None
    return float("inf") if noise == 0.0 else 10 * math.log10(signal / noise)


# --------------------------------------------------------------------------------------------
# Outlier channel splitting
# --------------------------------------------------------------------------------------------


def split_count(ratio: float, channels: int) -> int:
    """ceil(r * C) splits for a layer with C input channels (paper sec. 3.4).

    The product is rounded to 9 decimals first so that e.g. 0.07 * 100 = 7.000000000000001
    gives 7 splits, not 8.
    """
    if channels <= 0 or ratio <= 0:
        return 0
    return int(math.ceil(round(ratio * channels, 9)))


def plan_channel_splits(w: np.ndarray, in_axis: int, n_splits: int) -> list[int]:
    """Greedy OCS channel selection: which channel to split at each step.

    Returns the index (in the channel numbering at that step) of the channel split at each of
    ``n_splits`` steps. Each step splits the channel that holds the largest |w|; the halved copy
    is appended at the end, so it can be chosen again later. Ties go to the lowest index.
    """
    channel_max = list(max_abs(w, in_axis))
    splits = []
    for _ in range(n_splits):
        source = int(np.argmax(channel_max))
        channel_max[source] /= 2.0
        channel_max.append(channel_max[source])
        splits.append(source)
    return splits


def plan_activation_splits(outlier_counts: np.ndarray, ratio: float) -> list[int]:
    """Activation OCS channel selection (paper sec. 5.3): the ``ceil(r * C)`` channels with the
    most calibration values beyond the tensor's 99th percentile, in ascending order. A channel
    with no such value is never split (it holds no outlier to move); ties go to the lowest index.
    Each channel is split at most once: unlike weights, the values are not known, only counted.
    """
    counts = np.asarray(outlier_counts)
    ranked = np.argsort(-counts, kind="stable")[: split_count(ratio, counts.size)]
    return sorted(int(c) for c in ranked if counts[c] > 0)


def activation_split_factors(channels: int, split: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The Mul and Add constants of an activation split, over the channels after splitting
    (the original ones, then a copy of each split channel): both copies are halved, and the
    quantization-aware offsets are -1/4 and +1/4 of the activation step, so that
    Q(x/2 - s/4) + Q(x/2 + s/4) == Q(x) (the activation form of eq. 6, by Hermite's identity
    floor(y) + floor(y + 1/2) == floor(2y)). The offsets returned are in units of the step."""
    factor = np.ones(channels + len(split), dtype=np.float32)
    offset = np.zeros(channels + len(split), dtype=np.float32)
    factor[split] = 0.5
    factor[channels:] = 0.5
    offset[split] = -0.25
    offset[channels:] = 0.25
    return factor, offset


def channel_origins(channels: int, splits: list[int]) -> list[int]:
    """For each channel after splitting, the original input channel it copies."""
    origin = list(range(channels))
    for source in splits:
        origin.append(origin[source])
    return origin


def apply_channel_splits(
    w: np.ndarray,
    in_axis: int,
    splits: list[int],
    qa_scale: np.ndarray | None = None,
    out_axis: int | None = None,
) -> np.ndarray:
    """Replays ``splits`` on ``w``: each split halves a channel and appends the other half.

    Without ``qa_scale`` the split is naive, ``(v/2, v/2)``. With it the split is
    quantization-aware, ``((v - s/2)/2, (v + s/2)/2)`` with ``s`` the final scale (a scalar, or
    one value per slice along ``out_axis`` for per-channel scales). Either way the pieces add up
    to ``v``, so the layer computes the same function. The pieces are computed in float64 and
    stored in ``w``'s dtype; quantization-aware pieces are stored so that the levels
    ``quantize_symmetric`` gives them add up to the level of ``v`` exactly (see
    ``split_on_levels``). Without splits, ``w`` itself.
    """
    w = np.asarray(w)
    if not splits:
        return w
    in_axis %= w.ndim
    channels = list(np.moveaxis(w, in_axis, 0))  # views of w until split
    if qa_scale is None:
        for source in splits:
            half = (np.asarray(channels[source], dtype=np.float64) / 2.0).astype(w.dtype)
            channels[source] = half
            channels.append(half)
        return np.moveaxis(np.stack(channels, axis=0), 0, in_axis)
    scale = np.asarray(qa_scale, dtype=np.float64)
    if scale.ndim == 0 or out_axis is None:
        step = scale
    else:
        # position of out_axis inside one channel slice (the slice has lost in_axis)
        out_axis %= w.ndim
        slice_axis = out_axis if out_axis < in_axis else out_axis - 1
        step = expand_to(scale, w.ndim - 1, slice_axis)
    for source in splits:
        kept, copy = split_on_levels(channels[source], step)
        channels[source] = kept
        channels.append(copy)
    return np.moveaxis(np.stack(channels, axis=0), 0, in_axis)


def quantization_levels(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """floor(x / s + 1/2) in float64, unclamped: the arithmetic of ``quantize_symmetric``."""
    return np.floor(np.asarray(x, dtype=np.float64) / scale + 0.5)


def split_on_levels(value: np.ndarray, step: np.ndarray, max_ulps: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The quantization-aware pieces ``((v - s/2)/2, (v + s/2)/2)`` of ``value``, in its dtype,
    with levels that add up to the level of ``value``.

    In exact arithmetic they do (Hermite's identity). A value within rounding of a tie has its
    pieces within rounding of level boundaries too, and rounding a piece to float32 (or the
    float64 division itself) can carry it across, one level off. The piece nearer its boundary
    then moves by the fewest ulps that put it back; a level spans the scale, many ulps wide. A
    piece that cannot get there within ``max_ulps`` (a scale of a few subnormal ulps) stays as
    rounded.
    """
    value = np.asarray(value)
    dtype = value.dtype if np.issubdtype(value.dtype, np.floating) else np.dtype(np.float64)
    v = value.astype(np.float64).reshape(-1)
    s = np.broadcast_to(step, value.shape).reshape(-1)
    kept = ((v - s / 2.0) / 2.0).astype(dtype)
    copy = ((v + s / 2.0) / 2.0).astype(dtype)
    off = quantization_levels(v, s) - quantization_levels(kept, s) - quantization_levels(copy, s)
    wrong = np.nonzero(off)[0]
    if wrong.size:
        s_, k, c, o = s[wrong], kept[wrong], copy[wrong], off[wrong]

        def distance(piece):  # to the boundary on the side the level must move to, in steps
            y = piece.astype(np.float64) / s_ + 0.5
            frac = y - np.floor(y)
            return np.where(o < 0, frac, 1.0 - frac)

        move_kept = distance(k) <= distance(c)
        piece = np.where(move_kept, k, c)
        want = quantization_levels(piece, s_) + o
        moved = piece.copy()
        for _ in range(max_ulps):
            levels = quantization_levels(moved, s_)
            pending = levels != want
            if not pending.any():
                break
            toward = np.where(levels > want, -np.inf, np.inf).astype(dtype)
            moved[pending] = np.nextafter(moved[pending], toward[pending])
        piece = np.where(quantization_levels(moved, s_) == want, moved, piece)
        kept[wrong] = np.where(move_kept, piece, k)
        copy[wrong] = np.where(move_kept, c, piece)
    return kept.reshape(value.shape), copy.reshape(value.shape)


def merge_split_channels(w_split: np.ndarray, in_axis: int, origins: list[int], channels: int) -> np.ndarray:
    """Sums split pieces back onto their original channels (the weight the layer effectively uses)."""
    in_axis %= w_split.ndim
    moved = np.moveaxis(np.asarray(w_split, dtype=np.float64), in_axis, 0)
    if list(origins[:channels]) != list(range(channels)):
        merged = np.zeros((channels,) + moved.shape[1:], dtype=np.float64)
        np.add.at(merged, np.asarray(origins, dtype=np.int64), moved)
        return np.moveaxis(merged, 0, in_axis)
    # The usual layout (channel_origins): the channels in order, then the appended pieces. The
    # same sums in the same order as np.add.at, which is slow on large weights.
    merged = moved[:channels].copy()
    for index in range(channels, len(origins)):
        merged[origins[index]] += moved[index]
    return np.moveaxis(merged, 0, in_axis)

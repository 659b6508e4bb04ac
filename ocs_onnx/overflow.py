"""The 16-bit pair sums of onnxruntime's 8-bit matrix kernels on x86 CPUs without VNNI, and the
weight scales that keep them exact.

On AVX2, onnxruntime multiplies uint8 activations by int8 weights with ``vpmaddubsw``: two
adjacent products ``a_i q_i + a_j q_j`` (``a`` the activation as stored, zero point included;
``q`` the weight level) are added in 16 bits and saturate beyond 32767. On the full +-127 grid
a pair can reach 2 x 255 x 127 = 64770; the quantized model then computes something else, on
the machines that lack VNNI only.

Which products the kernel pairs depends on how it lays out the reduction axis K: consecutive
elements in matrix products; for a convolution, consecutive input channels at one kernel
position (onnxruntime's channels-last im2col, and its symmetric-weight kernel, which pads the
channels of each position), or consecutive positions of one channel (a channels-first layout).
The bound takes the largest pair sum over all of these pairings, each product at most |q|
times the largest stored value its input channel takes on the calibration data (the zero point
included, which padding reads). A row whose bound is over the limit gets a coarser scale, just
coarse enough to fit. The +-63 grid always fits (2 x 255 x 63 = 32130), so a row never loses
more than the 7-bit grid would cost it, and a row whose large weights meet only small inputs,
or no large weight of the same sign beside them, keeps all 8 bits.

The bound holds for inputs within each channel's calibrated range; a channel that goes beyond
it in deployment could overflow where a row's bound is close to the limit.
"""

from __future__ import annotations

import numpy as np

from .quant import ActivationQParams, quantize_symmetric

PAIR_SUM_LIMIT = 32767
# Room for the quantization-aware split (qa-split runs after the scales are fixed): each of its
# pieces' levels is within one level of the naive half's, so one pair moves by at most 2 x 255.
SPLIT_MARGIN = 2 * 255
# 2 x 255 x 63 fits: the coarsest scale the bound ever needs is alpha / 63.
ALWAYS_SAFE_LEVELS = 63
# Levels added to every channel's calibrated peak: the quantized model's activations are the
# float model's plus the quantization noise of the layers before (on the demo, up to 3 levels
# beyond the float peaks on the calibration data).
PEAK_MARGIN_LEVELS = 8


def stored_input_peaks(channel_max: np.ndarray, qparams: ActivationQParams) -> np.ndarray:
    """The largest value, as the kernel's unsigned operand, that each input channel takes
    (its calibrated maximum, PEAK_MARGIN_LEVELS above).

    uint8 activations are the operand as stored. For int8 activations onnxruntime's x86 kernels
    shift the operand to uint8 (+128); the peak is taken as the larger of the shifted level
    and the level's magnitude, which bounds either arithmetic.
    """
    levels = np.floor(np.asarray(channel_max, dtype=np.float64) / qparams.scale + 0.5) + qparams.zero_point
    levels += PEAK_MARGIN_LEVELS
    if np.dtype(qparams.dtype) == np.uint8:
        return np.maximum(np.clip(levels, 0, 255), qparams.zero_point)
    levels = np.clip(levels, -128, 127)
    return np.maximum(np.maximum(levels, qparams.zero_point) + 128, np.abs(levels))


def kernel_pairs(trailing: tuple[int, ...]) -> np.ndarray | None:
    """The pairs of a weight row's elements (indices into the row flattened in C order) that
    an 8-bit kernel may add in 16 bits, for a row of shape ``trailing``: (K,) for a matrix
    product, (C, *kernel) for a convolution. None for other layouts: any two may pair."""
    if len(trailing) == 1:
        return _consecutive(np.arange(trailing[0]))
    channels, positions = trailing[0], int(np.prod(trailing[1:]))
    flat = np.arange(channels * positions).reshape(channels, positions)
    channels_first = _consecutive(flat.reshape(-1))
    channels_last = _consecutive(flat.T.reshape(-1))
    per_position = np.stack([flat[0 : channels - 1 : 2], flat[1:channels:2]], axis=-1).reshape(-1, 2)
    return np.unique(np.sort(np.concatenate([channels_first, channels_last, per_position]), axis=1), axis=0)


def _consecutive(sequence: np.ndarray) -> np.ndarray:
    even = len(sequence) // 2 * 2
    return sequence[:even].reshape(-1, 2)


def pair_sum_bound(levels: np.ndarray, input_peaks: np.ndarray, pairs: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``levels`` (rows x K weight levels; ``input_peaks`` the peak of the input each
    multiplies, 1 x K or rows x K), the largest sum a pair of its products can reach: over
    ``pairs`` (P x 2 indices), or over any two (the two largest products of one sign)."""
    products = np.asarray(levels, dtype=np.float64) * np.asarray(input_peaks, dtype=np.float64)
    if products.shape[1] < 2:
        return np.abs(products).max(axis=1, initial=0.0)
    if pairs is None:
        top_positive = -np.partition(-np.maximum(products, 0.0), 1, axis=1)[:, :2].sum(axis=1)
        top_negative = -np.partition(np.minimum(products, 0.0), 1, axis=1)[:, :2].sum(axis=1)
        return np.maximum(top_positive, top_negative)
    if len(pairs) == 0:
        return np.abs(products).max(axis=1, initial=0.0)
    bound = np.empty(products.shape[0])
    for start in range(0, products.shape[0], 256):  # rows x pairs x 2 at a time, in bounded memory
        paired = products[start : start + 256][:, pairs]
        positive = np.maximum(paired, 0.0).sum(axis=2).max(axis=1)
        negative = (-np.minimum(paired, 0.0)).sum(axis=2).max(axis=1)
        bound[start : start + 256] = np.maximum(positive, negative)
    return bound


def overflow_safe_scale(
    rows: np.ndarray,
    scale: np.ndarray,
    input_peaks: np.ndarray,
    pairs: np.ndarray | None = None,
    limit: float = PAIR_SUM_LIMIT - SPLIT_MARGIN,
) -> np.ndarray:
    """The scale of every row of ``rows`` (rows x K weights; ``scale`` one per row, or one for
    all) raised where the row's pair-sum bound at 8 bits exceeds ``limit``: by the ratio of the
    two, then step by step until it fits, never beyond max|w| / 63, which always fits."""
    per_row = np.ndim(scale) > 0
    scale = np.array(np.broadcast_to(np.asarray(scale, dtype=np.float64), (rows.shape[0],)))
    ceiling = np.maximum(np.abs(rows).max(axis=1, initial=0.0) / ALWAYS_SAFE_LEVELS, scale)
    if not per_row:
        ceiling[:] = ceiling.max(initial=0.0)
    input_peaks = np.asarray(input_peaks)
    # the rows still to check: with a scale per row, a row that fits keeps its scale, and only
    # the others are quantized and bounded again
    active = np.arange(rows.shape[0])
    for _ in range(64):
        peaks = input_peaks[active] if input_peaks.ndim == 2 and input_peaks.shape[0] > 1 else input_peaks
        bound = pair_sum_bound(quantize_symmetric(rows[active], scale[active, None], 8), peaks, pairs)
        over = bound > limit
        if not per_row and over.any():
            over[:] = True
        if not over.any():
            break
        factor = np.where(over, np.maximum(bound / limit, 1.0 + 1e-3), 1.0)
        scale[active] = np.minimum(scale[active] * factor, ceiling[active])
        if not per_row:
            scale[:] = scale.max()
        else:
            active = active[over]
    return scale if per_row else np.asarray(scale[0])


def is_depthwise(group: int, weight_shape: tuple[int, ...]) -> bool:
    """A Conv with one input and one output channel per group. onnxruntime's depthwise kernel
    widens both operands to 16 bits before multiplying: it cannot overflow (and Hessian rounding
    gives each of its rows its own channel's inputs)."""
    return group > 1 and len(weight_shape) > 1 and weight_shape[1] == 1 and weight_shape[0] == group


def rows_and_input_peaks(
    w: np.ndarray, in_axis: int, out_axis: int, input_peaks: np.ndarray, group: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The weight as rows (one per output channel, each the K weights one output sums over),
    the peak of the input each weight multiplies (one row of K for all, 1 x K, or one per
    output channel for a grouped Conv, whose rows read different input channels, rows x K),
    and the pairs a kernel may add in 16 bits (``kernel_pairs``). ``input_peaks`` holds one
    value per channel of the layer's input tensor."""
    moved = np.moveaxis(w, out_axis, 0)
    out_channels, trailing = moved.shape[0], moved.shape[1:]
    position = in_axis + 1 if in_axis < out_axis else in_axis  # of the input axis in ``moved``
    per_group = trailing[position - 1]
    shape = [1] * len(trailing)
    shape[position - 1] = per_group
    channel = np.broadcast_to(np.arange(per_group).reshape(shape), trailing).reshape(-1)
    rows = moved.reshape(out_channels, -1)
    pairs = kernel_pairs(trailing) if position == 1 else None
    if group == 1:
        return rows, np.asarray(input_peaks)[channel][None, :], pairs
    group_of_row = np.arange(out_channels) // max(out_channels // group, 1)
    return rows, np.asarray(input_peaks)[group_of_row[:, None] * per_group + channel[None, :]], pairs


def layer_overflow_safe_scale(
    w: np.ndarray,
    in_axis: int,
    out_axis: int,
    group: int,
    scale: np.ndarray,
    qparams,
    channel_maxima: np.ndarray | None,
) -> np.ndarray:
    """``scale`` of a layer's (split) weight ``w`` raised where its 8-bit kernel could overflow
    its 16-bit pair sums, with its input quantized by ``qparams`` (``ActivationQParams``) and
    ``channel_maxima`` the calibrated maximum of each channel ``w`` multiplies (None: any
    level). A depthwise Conv's kernel is exact: its scale is returned as it is."""
    if is_depthwise(group, w.shape):
        return scale
    channels = w.shape[in_axis] * group
    known = channel_maxima is not None and channel_maxima.size == channels
    peaks = stored_input_peaks(channel_maxima, qparams) if known else np.full(channels, 255.0)
    rows, row_peaks, pairs = rows_and_input_peaks(w, in_axis, out_axis, peaks, group)
    return overflow_safe_scale(rows, scale, row_peaks, pairs).astype(np.asarray(scale).dtype)

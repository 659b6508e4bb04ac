"""Weight arithmetic that several passes share: which axis carries the scales, the clip
thresholds of a weight, and a layer's weight after its channel splits."""

from __future__ import annotations

import numpy as np

from .clip import weight_clip_threshold
from .config import CompileConfig
from .facts import Layer
from .gs_adapter import ComputedValues
from .quant import apply_channel_splits, max_abs
from .widening import duplicated


def scale_axis(layer: Layer, granularity: str) -> int | None:
    """The weight axis that carries one scale per slice, or None for one scale per tensor."""
    return layer.weight_out_axis if granularity == "channel" else None


def clip_thresholds(w: np.ndarray, axis: int | None, config: CompileConfig) -> np.ndarray:
    """The clip threshold of ``w`` as a whole (axis None) or of every slice along ``axis``."""
    if config.wclip == "none":
        return max_abs(w, axis)
    bits = config.weight_bits
    if axis is None:
        return np.asarray(weight_clip_threshold(w, config.wclip, bits, config.percentile))
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return np.array([weight_clip_threshold(row, config.wclip, bits, config.percentile) for row in rows])


def split_values(
    unsplit: np.ndarray, in_axis: int, splits: list[int], qa_scale=None, out_axis=None, out_copies=None
) -> ComputedValues:
    """A weight after its channel splits (naive halves, or quantization-aware pieces with
    ``qa_scale``, one per output channel of ``unsplit`` along ``out_axis``), and with the
    output rows ``out_copies = (axis, rows)`` appended once more (the layer computes copies of
    those channels for a split layer after it), computed from the unsplit weight whenever it is
    read, never stored."""
    shape = list(unsplit.shape)
    shape[in_axis] += len(splits)
    if out_copies is not None:
        shape[out_copies[0]] += len(out_copies[1])
    splits = list(splits)

    def compute() -> np.ndarray:
        w = apply_channel_splits(unsplit, in_axis, splits, qa_scale=qa_scale, out_axis=out_axis)
        if out_copies is None:
            return w
        return duplicated(w, *out_copies)

    return ComputedValues(compute, shape, unsplit.dtype)


def without_copies(values: np.ndarray, out_axis: int, copies: list[int]) -> np.ndarray:
    """The weight (or per-channel values) without the appended copies of output rows."""
    if not copies:
        return values
    return np.take(values, np.arange(values.shape[out_axis] - len(copies)), axis=out_axis)


def with_copies(values: np.ndarray, copies: list[int]) -> np.ndarray:
    """Per-output-channel values (scales, thresholds) with the copied channels' appended; a
    scalar (one value per tensor) as it is."""
    values = np.asarray(values)
    if not copies or values.ndim == 0:
        return values
    return duplicated(values, 0, copies)

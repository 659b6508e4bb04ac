"""Hessian-aware rounding (GPTQ/OBQ, Frantar et al. 2022) and bias correction, from streaming
statistics of each layer's input.

A layer computes ``y = W x`` row by row, with ``x`` one row of its input features: a Gemm or
MatMul row, or a Conv's im2col patch (input channel, kernel row, kernel column, in the order
of the weight's own layout). Rounding W to the grid adds the output error ``(W - Q) x``; over
the calibration data its square is ``tr((W - Q) H (W - Q)^T)`` with ``H = sum x x^T``. GPTQ
rounds one input column at a time and moves the rounding error of that column onto the columns
not yet rounded, along H's inverse, so that the output error, not the weight error, is what
the rounding keeps small. Memory is H's (features squared), whatever the number of samples:
``InputGram`` adds every calibration batch into it and forgets the batch.

Bias correction then adds ``(W - Q) E[x]`` to the bias: the mean shift of every output channel
that the rounding caused, so that the quantized layer's mean output is the float layer's on the
calibration data (Nagel et al. 2019; Banner et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quant import expand_to, symmetric_qmax

# Input rows a calibration sample adds at most (a Conv's output positions, a sequence's steps),
# drawn at random without replacement: H needs many more rows than features, not every one.
ROWS_PER_SAMPLE = 256
# A depthwise Conv's Gram matrices are kernel positions squared (9 x 9 for 3 x 3): fewer rows do.
DEPTHWISE_ROWS_PER_SAMPLE = 64
# GPTQ's dampening: this fraction of H's mean diagonal is added to the diagonal, so that H is
# invertible (features that never vary, duplicated OCS channels) and the feedback stays tame.
DAMPENING = 0.01
BLOCK = 128


@dataclass(frozen=True)
class InputLayout:
    """How a layer reads its input as rows of features. ``kind`` "rows": the last axis holds the
    features (Gemm, MatMul); "conv2d": im2col patches of a 2-D Conv with group 1; "depthwise2d":
    a depthwise 2-D Conv's patches, one channel each (one Gram matrix per channel)."""

    tensor: str
    kind: str
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # begin h, begin w, end h, end w
    dilations: tuple[int, int] = (1, 1)


def conv_patches(x: np.ndarray, layout: InputLayout, rng: np.random.Generator, per_sample: int) -> np.ndarray:
    """Up to ``per_sample`` im2col patches of every sample of ``x`` (N, C, H, W), drawn at random
    output positions, as rows of C x kh x kw features (float64)."""
    patches = _patches_channels_last(x, layout, rng, per_sample)  # rows x positions x channels
    return np.ascontiguousarray(patches.transpose(0, 2, 1)).reshape(len(patches), -1)


def _patches_channels_last(x: np.ndarray, layout: InputLayout, rng: np.random.Generator, per_sample: int) -> np.ndarray:
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = layout.kernel, layout.strides, layout.dilations
    top, left, bottom, right = layout.pads
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    positions = out_h * out_w
    if positions <= 0:
        return np.zeros((0, kh * kw, c))
    # channels last, so that one patch position of one output is a contiguous row of channels
    padded = np.pad(np.asarray(x).transpose(0, 2, 3, 1), ((0, 0), (top, bottom), (left, right), (0, 0)))
    take = min(per_sample, positions)
    chosen = np.concatenate([np.sort(rng.choice(positions, take, replace=False)) + i * positions for i in range(n)])
    sample, position = np.divmod(chosen, positions)
    oy, ox = np.divmod(position, out_w)
    rows_of = padded.reshape(-1, c)  # one row per (sample, y, x): np.take of whole rows is fast
    padded_h, padded_w = padded.shape[1], padded.shape[2]
    patches = np.empty((len(chosen), kh * kw, c), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            index = (sample * padded_h + oy * sh + i * dh) * padded_w + ox * sw + j * dw
            patches[:, i * kw + j, :] = np.take(rows_of, index, axis=0)
    return patches


def input_rows(values: np.ndarray, layout: InputLayout, rng: np.random.Generator, per_sample: int) -> np.ndarray:
    """A layer's input as rows of its features (float64), at most ``per_sample`` per sample drawn
    at random: im2col patches for "conv2d" (``values`` N, C, H, W), the last axis for "rows"."""
    if layout.kind == "conv2d":
        return conv_patches(values, layout, rng, per_sample)
    samples = values.shape[0] if values.ndim > 1 else 1
    rows = values.reshape(-1, values.shape[-1])
    take = min(len(rows), per_sample * samples)
    if take < len(rows):
        rows = rows[np.sort(rng.choice(len(rows), take, replace=False))]
    return rows.astype(np.float64)


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^T b`` of one batch's rows, multiplied in float32 (twice as fast as float64, and one
    batch's few thousand rows lose nothing that GPTQ's 1 % dampening would not swamp), summed
    into the float64 totals by the caller."""
    return np.asarray(a, dtype=np.float32).T @ np.asarray(b, dtype=np.float32)


class InputGram:
    """``sum x x^T``, ``sum x`` and the row count of a layer's input rows, batch by batch."""

    def __init__(self, layout: InputLayout, seed: int, per_sample: int = ROWS_PER_SAMPLE):
        self.layout = layout
        self.per_sample = per_sample
        self.rng = np.random.default_rng(seed)
        self.gram: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.rows = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values)  # rows are widened to float64 once gathered, not the whole tensor
        if self.layout.kind == "depthwise2d":
            if values.ndim == 4:
                self._update_per_channel(values)
            return
        if self.layout.kind == "conv2d" and values.ndim != 4:
            return
        rows = input_rows(values, self.layout, self.rng, self.per_sample)
        if not np.isfinite(rows).all():
            rows = np.where(np.isfinite(rows), rows, 0.0)
        if self.gram is None:
            self.gram = np.zeros((rows.shape[1], rows.shape[1]))
            self.total = np.zeros(rows.shape[1])
        if rows.shape[1] != self.gram.shape[0]:
            return
        self.gram += _gram(rows, rows)
        self.total += rows.sum(axis=0)
        self.rows += len(rows)

    def _update_per_channel(self, values: np.ndarray) -> None:
        channels = values.shape[1]
        per_sample = min(self.per_sample, DEPTHWISE_ROWS_PER_SAMPLE)
        patches = _patches_channels_last(values, self.layout, self.rng, per_sample)  # rows x K x C
        if not np.isfinite(patches).all():
            patches = np.where(np.isfinite(patches), patches, 0.0)
        if self.gram is None:
            self.gram = np.zeros((channels, self.positions, self.positions))
            self.total = np.zeros((channels, self.positions))
        if self.gram.shape[0] != channels:
            return
        # every channel's K x K products, one pair of kernel positions at a time over all
        # channels (contiguous rows; a per-channel layout would cost a slow transposed copy)
        for a in range(self.positions):
            for b in range(a + 1):
                products = np.einsum("rc,rc->c", patches[:, a, :], patches[:, b, :])
                self.gram[:, a, b] += products
                if a != b:
                    self.gram[:, b, a] += products
        self.total += patches.sum(axis=0).T
        self.rows += len(patches)

    @property
    def positions(self) -> int:
        return int(np.prod(self.layout.kernel))

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.total is None or self.rows == 0 else self.total / self.rows


class PairedGram:
    """For one layer, batch by batch: ``H = sum x~ x~^T`` of its input rows in the quantized
    model, and ``C = sum x x~^T`` with the float model's rows at the same positions (the float
    input has the layer's original features, the quantized one its split layout). GPTQ on H
    rounds the weight for the inputs it will really get; with C,
    ``||W x - Q x~||^2 = tr(Q H Q^T) - 2 tr(W C Q^T) + const`` says how far the quantized
    layer's output then is from the float layer's."""

    def __init__(self, layout: InputLayout, quantized_tensor: str, seed: int, per_sample: int = ROWS_PER_SAMPLE):
        self.layout = layout  # of the float input
        self.quantized_tensor = quantized_tensor
        self.per_sample = per_sample
        self.rng = np.random.default_rng(seed)
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray, x_quantized: np.ndarray) -> None:
        x, x_quantized = np.asarray(x), np.asarray(x_quantized)
        if self.layout.kind == "conv2d" and (x.ndim != 4 or x_quantized.ndim != 4):
            return
        if x.shape[0] != x_quantized.shape[0] or (
            self.layout.kind == "conv2d" and x.shape[2:] != x_quantized.shape[2:]
        ):
            return
        seed = int(self.rng.integers(2**63))  # the same positions in both
        rows = input_rows(x, self.layout, np.random.default_rng(seed), self.per_sample)
        rows_quantized = input_rows(x_quantized, self.layout, np.random.default_rng(seed), self.per_sample)
        if len(rows) != len(rows_quantized):
            return
        rows = np.where(np.isfinite(rows), rows, 0.0)
        rows_quantized = np.where(np.isfinite(rows_quantized), rows_quantized, 0.0)
        if self.gram is None:
            self.gram = np.zeros((rows_quantized.shape[1], rows_quantized.shape[1]))
            self.cross = np.zeros((rows.shape[1], rows_quantized.shape[1]))
        if self.cross.shape != (rows.shape[1], rows_quantized.shape[1]):
            return
        self.gram += _gram(rows_quantized, rows_quantized)
        self.cross += _gram(rows, rows_quantized)
        self.rows += len(rows)


def float_output_objective(
    rows: np.ndarray, levels: np.ndarray, scale: np.ndarray, gram: np.ndarray, cross: np.ndarray
) -> float:
    """``||W X - Q X~||^2`` less its constant ``||W X||^2``: ``tr(Q H Q^T) - 2 tr(W C Q^T)``, for
    the weight ``rows`` (W, the layer's split layout: rows x features), its ``levels`` on grid
    ``scale`` (Q), and a ``PairedGram``'s H and C with C's float features already spread over
    the split layout (features x features)."""
    s = np.broadcast_to(
        expand_to(np.asarray(scale, dtype=np.float64), 2, 0 if np.ndim(scale) else None), (rows.shape[0], 1)
    )
    dequantized = levels * s
    w = np.asarray(rows, dtype=np.float64)
    return float(np.sum((dequantized @ gram) * dequantized) - 2 * np.sum((w @ cross) * dequantized))


def hessian_levels(
    rows: np.ndarray,
    gram: np.ndarray,
    scale: np.ndarray,
    bits: int,
    dampening: float = DAMPENING,
    largest_first: bool = True,
) -> np.ndarray:
    """GPTQ: the integer levels (rows x features, within +-qmax) of the weight ``rows`` (one per
    output channel) on the fixed grid ``scale`` (one per row, or one for all), chosen column by
    column with the rounding error fed back onto the columns after it through ``gram``'s
    inverse. Round half up, as nearest rounding does. ``largest_first``: the columns whose
    inputs carry the most energy (H's diagonal) are rounded first, while the most columns are
    left to absorb their error (GPTQ's "act order")."""
    if largest_first:
        order = np.argsort(-np.diag(gram), kind="stable")
        levels = hessian_levels(rows[:, order], gram[np.ix_(order, order)], scale, bits, dampening, False)
        return levels[:, np.argsort(order)]
    qmax = symmetric_qmax(bits)
    w = np.array(rows, dtype=np.float64)
    s = expand_to(np.asarray(scale, dtype=np.float64), 2, 0 if np.ndim(scale) else None)
    s = np.broadcast_to(s, (w.shape[0], 1))
    upper = _inverse_cholesky(gram, dampening)
    levels = np.zeros(w.shape, dtype=np.int64)
    features = w.shape[1]
    for start in range(0, features, BLOCK):
        end = min(start + BLOCK, features)
        block = w[:, start:end].copy()
        errors = np.zeros_like(block)
        u = upper[start:end, start:end]
        for j in range(end - start):
            column = block[:, j : j + 1]
            q = np.clip(np.floor(column / s + 0.5), -qmax, qmax)
            levels[:, start + j] = q[:, 0]
            error = (column - q * s) / u[j, j]
            block[:, j:] -= error @ u[j : j + 1, j:]
            errors[:, j : j + 1] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return levels


def hessian_levels_per_row(
    rows: np.ndarray, grams: np.ndarray, scale: np.ndarray, bits: int, dampening: float = DAMPENING
) -> np.ndarray:
    """GPTQ for rows that each read their own inputs (a depthwise Conv: row o sees channel o
    only), with one Gram matrix per row (rows x K x K): every row rounded as ``hessian_levels``
    rounds one, all rows at once."""
    qmax = symmetric_qmax(bits)
    w = np.array(rows, dtype=np.float64)
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (w.shape[0],))
    upper = np.stack([_inverse_cholesky(g, dampening) for g in grams])
    levels = np.zeros(w.shape, dtype=np.int64)
    for j in range(w.shape[1]):
        q = np.clip(np.floor(w[:, j] / s + 0.5), -qmax, qmax)
        levels[:, j] = q
        error = (w[:, j] - q * s) / upper[:, j, j]
        w[:, j:] -= error[:, None] * upper[:, j, j:]
    return levels


def _inverse_cholesky(gram: np.ndarray, dampening: float) -> np.ndarray:
    """The upper Cholesky factor of the dampened ``gram``'s inverse (GPTQ's ``Hinv``). Features
    that never varied (zero diagonal) get a unit diagonal: nothing is fed onto them."""
    h = np.array(gram, dtype=np.float64)
    diagonal = np.diag(h).copy()
    dead = diagonal <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    for attempt in range(6):
        damped = h + np.eye(len(h)) * dampening * mean * (10.0**attempt)
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(damped))  # L^-1, with damped = L L^T
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the input statistics give no positive definite Hessian")


def output_error(rows: np.ndarray, levels: np.ndarray, scale: np.ndarray, gram: np.ndarray) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the squared output error of rounding ``rows`` to ``levels``
    over the rows whose ``gram`` this is (one K x K for all rows, or one per row)."""
    s = np.broadcast_to(
        expand_to(np.asarray(scale, dtype=np.float64), 2, 0 if np.ndim(scale) else None), (rows.shape[0], 1)
    )
    delta = np.asarray(rows, dtype=np.float64) - levels * s
    if gram.ndim == 3:
        return float(np.sum(np.matmul(delta[:, None, :], gram)[:, 0, :] * delta))
    return float(np.sum((delta @ gram) * delta))

"""Activation arithmetic that several passes share: the clip threshold, the Q/DQ parameters and
the estimated quantization SQNR of an activation, from its calibration statistics."""

from __future__ import annotations

from dataclasses import dataclass

from .clip import aciq_threshold_histogram, kl_threshold, mse_threshold_histogram, percentile_threshold_histogram
from .config import CompileConfig
from .histogram import SymmetricHistogram
from .quant import ActivationQParams, asymmetric_uint8_qparams, histogram_sqnr_db, symmetric_int8_qparams


def activation_qparams(lo: float, hi: float, bits: int, activation_type: str) -> ActivationQParams:
    if activation_type == "uint8":
        return asymmetric_uint8_qparams(lo, hi, bits)
    return symmetric_int8_qparams(lo, hi, bits)


def activation_threshold(histogram: SymmetricHistogram, lo: float, config: CompileConfig) -> float:
    """The ``--aclip`` threshold of |x| for one activation."""
    counts, edges = histogram.absolute()
    bits, method = config.abits, config.aclip
    unsigned = lo >= 0 and config.activation_type == "uint8"
    if method == "mse":
        return mse_threshold_histogram(counts, edges, bits, symmetric=not unsigned)
    if method == "aciq":
        return aciq_threshold_histogram(counts, edges, bits)
    if method == "kl":
        if unsigned:
            # As TensorRT does for a Relu output: the spike of zeros would dominate the divergence
            # (it takes the height of its neighbour instead), and the unsigned grid has twice the
            # levels over [0, alpha] of the symmetric one.
            counts = counts.copy()
            counts[0] = counts[1]
            return kl_threshold(counts, edges, bits, unsigned=True)
        return kl_threshold(counts, edges, bits)
    return percentile_threshold_histogram(counts, edges, config.percentile)


@dataclass(frozen=True)
class ClippedActivation:
    """An activation's range after ``--aclip`` (and the threshold, None without a clip
    method or a histogram), its parameters, and its SQNR under them estimated on the histogram (None without
    one)."""

    range: tuple[float, float]
    threshold: float | None
    qparams: ActivationQParams
    sqnr_db: float | None


def clipped_activation(
    value_range: tuple[float, float], histogram: SymmetricHistogram | None, config: CompileConfig
) -> ClippedActivation:
    lo, hi = value_range
    alpha = None
    if config.aclip != "none" and histogram is not None and histogram.limit > 0:
        alpha = activation_threshold(histogram, lo, config)
        if alpha > 0:
            lo, hi = max(lo, -alpha), min(hi, alpha)
    qp = activation_qparams(lo, hi, config.abits, config.activation_type)
    sqnr = None
    if histogram is not None and histogram.limit > 0:
        sqnr = histogram_sqnr_db(histogram.counts, histogram.edges, qp, config.abits)
    return ClippedActivation((lo, hi), alpha, qp, sqnr)

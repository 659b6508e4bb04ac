"""clip-weights: the clip threshold and quantization scale of every selected layer's weight,
found on the weights as they are after splitting (OCS + clip, paper sec. 5.2-5.3): OCS has
already shrunk the range, the clip method then trades the remaining outliers against rounding.

alpha = the ``--wclip`` threshold (max|w| for ``none``), per tensor or per output channel
(``--granularity``); scale = alpha / (2^(k-1) - 1).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.clip import weight_clip_threshold
from ocs_onnx.config import CompileConfig
from ocs_onnx.context import CompileContext, LayerPlan
from ocs_onnx.pass_manager import Pass
from ocs_onnx.quant import max_abs, symmetric_scale


def scale_axis(plan: LayerPlan, granularity: str) -> int | None:
    """The weight axis that carries one scale per slice, or None for one scale per tensor."""
    return plan.weight_out_axis if granularity == "channel" else None


def clip_thresholds(w: np.ndarray, axis: int | None, config: CompileConfig) -> np.ndarray:
    """The clip threshold of ``w`` as a whole (axis None) or of every slice along ``axis``."""
    if config.wclip == "none":
        return max_abs(w, axis)
    bits = config.weight_bits
    if axis is None:
        return np.asarray(weight_clip_threshold(w, config.wclip, bits, config.percentile))
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return np.array([weight_clip_threshold(row, config.wclip, bits, config.percentile) for row in rows])


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    for plan in ctx.layers:
        axis = scale_axis(plan, ctx.config.granularity)
        w = plan.weight.values  # computed from the original weight for a split layer: read once
        plan.max_abs = max_abs(w, axis)
        plan.clip_threshold = clip_thresholds(w, axis, ctx.config)
        plan.scale = symmetric_scale(plan.clip_threshold, ctx.config.weight_bits)
        ctx.done_with(plan.original_weight)


PASS = Pass("clip-weights", "clip thresholds (--wclip) and scales of the split weights, per tensor or per channel", run)

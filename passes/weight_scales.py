"""weight-scales: the weight quantization scale of every selected layer, computed on the
weights as they are after splitting (so OCS's smaller range gives a finer grid).

scale = max|w| / (2^(k-1) - 1), per tensor or per output channel (``--granularity``).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext, LayerPlan
from ocs_onnx.pass_manager import Pass
from ocs_onnx.quant import max_abs, symmetric_scale


def scale_axis(plan: LayerPlan, granularity: str) -> int | None:
    """The weight axis that carries one scale per slice, or None for one scale per tensor."""
    return plan.weight_out_axis if granularity == "channel" else None


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    for plan in ctx.layers:
        axis = scale_axis(plan, ctx.config.granularity)
        plan.scale = symmetric_scale(max_abs(plan.weight.values, axis), ctx.config.weight_bits)


PASS = Pass("weight-scales", "compute weight scales (per tensor or per output channel) after splitting", run)

"""qa-split: turns the naive halves of every split channel into the quantization-aware split
of the paper's eq. 6, using the final scale s:  v -> ((v - s/2)/2, (v + s/2)/2).

The two pieces still add up to v (the layer computes the same function), and their quantized
values add up to Q(v) exactly, where the naive halves can both round the same way.
``--split naive`` leaves the halves as they are.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.pass_manager import Pass

from .clip_weights import scale_axis
from .weight_ocs import split_values


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    if ctx.config.split != "qa":
        return
    for plan in ctx.layers:
        if not plan.splits:
            continue
        plan.weight.values = split_values(plan, qa_scale=plan.scale, out_axis=scale_axis(plan, ctx.config.granularity))


PASS = Pass("qa-split", "apply quantization-aware split offsets with the final scale (--split qa)", run)

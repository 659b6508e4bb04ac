"""upgrade-opset: per-axis DequantizeLinear (per-channel weight scales) needs opset 13, so older
models are converted with onnx's version converter, or refused with the reason it failed."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.errors import UnsupportedModelError, first_line
from ocs_onnx.facts import OPSET_13
from ocs_onnx.gs_adapter import graph_from_skeleton, graph_skeleton
from ocs_onnx.pass_manager import GraphEffect, compiler_pass

MIN_OPSET = 13


@compiler_pass("upgrade-opset", produces=(OPSET_13,), effect=GraphEffect.REWRITES)
def upgrade_opset(graph: gs.Graph, ctx: CompileContext) -> gs.Graph | None:
    """Opsets below 13 are converted with onnx's version converter (per-axis DequantizeLinear
    needs 13) or refused."""
    ctx.facts[OPSET_13] = True
    if graph.opset >= MIN_OPSET:
        ctx.count(opset_in=graph.opset, opset_out=graph.opset)
        return None
    model, left_out = graph_skeleton(graph)
    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises bare RuntimeErrors and checker errors
        reason = first_line(exc)
        # the converter's assertions start with its source location: keep what failed
        reason = reason.split("failed:", 1)[-1].strip()
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {graph.opset} to {MIN_OPSET} "
            f"(needed for per-channel DequantizeLinear): {reason}"
        )
    ctx.count(opset_in=graph.opset, opset_out=MIN_OPSET)
    return graph_from_skeleton(upgraded, left_out)

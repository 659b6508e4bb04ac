"""infer-shapes: ONNX shape inference, so that inserted nodes get typed outputs and calibration
knows tensor ranks. Dynamic dimensions (batch, sequence) stay symbolic."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.errors import first_line
from ocs_onnx.model_io import graph_from_skeleton, graph_skeleton
from ocs_onnx.pass_manager import Pass


def run(graph: gs.Graph, ctx: CompileContext) -> gs.Graph | None:
    model, left_out = graph_skeleton(graph)  # large weights as typed inputs: inference needs no values
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a convenience; a model it cannot follow still compiles
        ctx.warn(f"shape inference failed, continuing without it: {first_line(exc)}")
        return None
    return graph_from_skeleton(inferred, left_out)


PASS = Pass("infer-shapes", "run ONNX shape inference (dynamic dimensions stay dynamic)", run)

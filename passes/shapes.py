"""infer-shapes: ONNX shape inference, so that inserted nodes get typed outputs and calibration
knows tensor ranks. Dynamic dimensions (batch, sequence) stay symbolic."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.errors import first_line
from ocs_onnx.facts import TENSOR_TYPES
from ocs_onnx.gs_adapter import graph_from_skeleton, graph_skeleton
from ocs_onnx.pass_manager import GraphEffect, compiler_pass


def _rank_of_static_vector(value: onnx.ValueInfoProto | None) -> int | None:
    """The length of a 1-D tensor whose length is a known number, else None."""
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 1 or not dims[0].HasField("dim_value"):
        return None
    return dims[0].dim_value


def complete_reshape_ranks(model: onnx.ModelProto) -> int:
    """Gives a rank to every Reshape output that ONNX inference left without a shape because
    the target shape is computed at run time (paddle2onnx and torch exports build it as a
    Concat of Shape slices). The target's length alone fixes the output's rank, and the rank
    is what later passes need: a 2-D MatMul input becomes a Gemm, which runs as an integer
    kernel. Returns the number of outputs completed."""
    graph = model.graph
    values = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    completed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        out = values.get(node.output[0])
        if out is not None and out.type.tensor_type.HasField("shape"):
            continue
        rank = _rank_of_static_vector(values.get(node.input[1]))
        data = values.get(node.input[0])
        if rank is None or data is None or any(o.name == node.output[0] for o in graph.output):
            continue
        elem_type = data.type.tensor_type.elem_type
        # Dimensions stay unknown (no value, no name): only the rank is claimed.
        graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], elem_type, [None] * rank))
        completed += 1
    return completed


@compiler_pass("infer-shapes", produces=(TENSOR_TYPES,), effect=GraphEffect.REPLACES)
def infer_shapes(graph: gs.Graph, ctx: CompileContext) -> gs.Graph | None:
    """ONNX shape inference; dynamic batch/sequence dims stay dynamic."""
    # Types the model declares stay where inference cannot follow: the passes after get what
    # there is.
    ctx.facts[TENSOR_TYPES] = True
    model, left_out = graph_skeleton(graph)  # large weights as typed inputs: inference needs no values
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        # A completed rank lets inference reach the layers after the Reshape; a second
        # Reshape downstream may then be completed in turn.
        for _ in range(4):
            if complete_reshape_ranks(inferred) == 0:
                break
            inferred = onnx.shape_inference.infer_shapes(inferred, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a convenience; a model it cannot follow still compiles
        ctx.warn(f"shape inference failed, continuing without it: {first_line(exc)}")
        return None
    return graph_from_skeleton(inferred, left_out)

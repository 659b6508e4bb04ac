"""canonicalize-linear: puts fully connected layers in the form onnxruntime fuses best.

* ``MatMul(A, W) + b`` with a 2-D A and a constant bias becomes ``Gemm(A, W, b)``. onnxruntime
  would do the same rewrite itself, but only after our QuantizeLinear/DequantizeLinear pairs
  are in place, leaving a float bias that blocks the integer kernel; doing it first lets the
  bias be quantized to int32 with the layer.
* Gemm's ``alpha`` is folded into a constant B and ``beta`` into a constant C, so the int32 bias
  of the fused kernel has the plain scale input x weight.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import CONSTANT_WEIGHTS, LINEAR_CANONICAL, TENSOR_TYPES
from ocs_onnx.pass_manager import GraphEffect, compiler_pass


def _constant_bias(add: gs.Node, matmul_out: gs.Variable, columns: int) -> gs.Constant | None:
    others = [t for t in add.inputs if t is not matmul_out]
    if len(add.inputs) != 2 or len(others) != 1 or not isinstance(others[0], gs.Constant):
        return None
    bias = others[0]
    if bias.values.dtype != np.float32 or bias.values.size != columns or bias.values.ndim > 2:
        return None
    return bias


def fuse_matmul_add(graph: gs.Graph, ctx: CompileContext) -> int:
    graph_outputs = {t.name for t in graph.outputs}
    fused = 0
    for matmul in list(graph.nodes):
        if matmul.op != "MatMul" or not isinstance(matmul.inputs[1], gs.Constant):
            continue
        a, w, out = matmul.inputs[0], matmul.inputs[1], matmul.outputs[0]
        if w.values.ndim != 2 or a.shape is None or len(a.shape) != 2:
            continue
        if out.name in graph_outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
            continue
        add = out.outputs[0]
        bias = _constant_bias(add, out, w.values.shape[1])
        if bias is None:
            continue
        flat_bias = gs.Constant(ctx.unique_name(f"{bias.name}_flat"), bias.values.reshape(-1))
        add_out = add.outputs[0]
        add.inputs.clear()
        add.outputs.clear()
        matmul.outputs.clear()
        gemm = gs.Node("Gemm", matmul.name, inputs=[a, w, flat_bias], outputs=[add_out])
        matmul.inputs.clear()
        graph.nodes.append(gemm)
        fused += 1
    return fused


def fold_gemm_scalars(graph: gs.Graph, ctx: CompileContext) -> int:
    folded = 0
    for gemm in graph.nodes:
        if gemm.op != "Gemm" or len(gemm.inputs) < 2 or not isinstance(gemm.inputs[1], gs.Constant):
            continue
        alpha, beta = float(gemm.attrs.get("alpha", 1.0)), float(gemm.attrs.get("beta", 1.0))
        has_c = len(gemm.inputs) > 2
        if beta != 1.0 and has_c and not isinstance(gemm.inputs[2], gs.Constant):
            continue
        if alpha != 1.0:
            b = gemm.inputs[1]
            gemm.inputs[1] = gs.Constant(
                ctx.unique_name(f"{b.name}_alpha"), (b.values.astype(np.float64) * alpha).astype(b.values.dtype)
            )
            gemm.attrs["alpha"] = 1.0
        if beta != 1.0 and has_c:
            c = gemm.inputs[2]
            gemm.inputs[2] = gs.Constant(
                ctx.unique_name(f"{c.name}_beta"), (c.values.astype(np.float64) * beta).astype(c.values.dtype)
            )
            gemm.attrs["beta"] = 1.0
        folded += int(alpha != 1.0 or (beta != 1.0 and has_c))
    return folded


# the fusion needs the rank of the MatMul's input, and a constant weight and bias
@compiler_pass("canonicalize-linear", requires=(TENSOR_TYPES, CONSTANT_WEIGHTS), produces=(LINEAR_CANONICAL,),
               effect=GraphEffect.REWRITES)
def canonicalize_linear(graph: gs.Graph, ctx: CompileContext) -> None:
    """`MatMul + Add` on 2-D inputs becomes `Gemm`; Gemm alpha/beta fold into constants."""
    ctx.count(matmul_add_to_gemm=fuse_matmul_add(graph, ctx))
    graph.cleanup()
    ctx.count(gemm_scalars_folded=fold_gemm_scalars(graph, ctx))
    ctx.facts[LINEAR_CANONICAL] = True

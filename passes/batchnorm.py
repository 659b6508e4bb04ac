"""fold-batchnorm: a BatchNormalization right after a Conv is folded into the Conv's weights
and bias, so the weights are quantized (and split) as they will actually run.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * k) + (b - mean) * k + beta,      k = gamma / sqrt(var + eps) per channel
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import BATCHNORMS_FOLDED, CONSTANT_WEIGHTS
from ocs_onnx.pass_manager import GraphEffect, compiler_pass


def _foldable(conv: gs.Node, bn: gs.Node, graph_outputs: set[str]) -> bool:
    conv_out = conv.outputs[0]
    return (
        bn.op == "BatchNormalization"
        and len(conv_out.outputs) == 1
        and conv_out.name not in graph_outputs
        and len(bn.outputs) == 1  # inference form: no running-statistics outputs
        and isinstance(conv.inputs[1], gs.Constant)
        and (len(conv.inputs) < 3 or isinstance(conv.inputs[2], gs.Constant))
        and all(isinstance(t, gs.Constant) for t in bn.inputs[1:5])
    )


def fold_batchnorm_into_conv(w, b, gamma, beta, mean, var, eps):
    """Pure numeric fold; float64 inside, weights' dtype out."""
    k = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    w_folded = w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))
    b_folded = (b.astype(np.float64) - mean) * k + beta
    return w_folded.astype(w.dtype), b_folded.astype(w.dtype)


@compiler_pass("fold-batchnorm", requires=(CONSTANT_WEIGHTS,), produces=(BATCHNORMS_FOLDED,),
               effect=GraphEffect.REWRITES)
def fold_batchnorm(graph: gs.Graph, ctx: CompileContext) -> None:
    """BatchNormalization after Conv folds into the Conv's weights and bias."""
    graph_outputs = {t.name for t in graph.outputs}
    folded = 0
    for conv in list(graph.nodes):
        if conv.op != "Conv" or len(conv.outputs[0].outputs) != 1:
            continue
        bn = conv.outputs[0].outputs[0]
        if not _foldable(conv, bn, graph_outputs):
            continue
        w = conv.inputs[1].values
        out_channels = w.shape[0]
        b = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(out_channels, w.dtype)
        gamma, beta, mean, var = (t.values for t in bn.inputs[1:5])
        if any(p.shape != (out_channels,) for p in (gamma, beta, mean, var, b)):
            continue
        w_new, b_new = fold_batchnorm_into_conv(w, b, gamma, beta, mean, var, bn.attrs.get("epsilon", 1e-5))
        conv.inputs[1] = gs.Constant(ctx.unique_name(conv.inputs[1].name + "_bnfolded"), w_new)
        bias = gs.Constant(ctx.unique_name(f"{conv.name}_bias_bnfolded"), b_new)
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        # The Conv now writes the BN's output tensor; the BN node is left without inputs/outputs.
        bn_out = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = bn_out
        folded += 1
    ctx.count(batchnorms_folded=folded)
    ctx.facts[BATCHNORMS_FOLDED] = True

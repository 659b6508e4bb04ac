"""constants-to-initializers: weights held in Constant nodes (and constant subgraphs such as
Constant -> Transpose -> MatMul) become initializers, so later passes see them as weights.

paddle2onnx and torch exports keep weights in Constant nodes; layer selection only considers a
layer whose weight input is a constant tensor.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import CONSTANT_WEIGHTS
from ocs_onnx.pass_manager import GraphEffect, compiler_pass

# Ops whose output differs from run to run: folding one would freeze a single draw into the model
# and change what it computes.
NON_DETERMINISTIC_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")

# Folding never produces a constant larger than this: an Expand/Tile of a small constant can
# blow up into a tensor far bigger than the subgraph that computes it.
MAX_FOLDED_BYTES = 64 << 20


@compiler_pass("constants-to-initializers", produces=(CONSTANT_WEIGHTS,), effect=GraphEffect.REWRITES)
def constants_to_initializers(graph: gs.Graph, ctx: CompileContext) -> None:
    """Constant nodes and constant subgraphs become initializers."""
    before = sum(1 for n in graph.nodes if n.op == "Constant")
    # onnx-graphsurgeon folds Constant nodes and evaluates constant subgraphs with onnxruntime.
    # Existing QuantizeLinear/DequantizeLinear nodes are left alone: they belong to the model.
    keep = ("QuantizeLinear", "DequantizeLinear", *NON_DETERMINISTIC_OPS)
    graph.fold_constants(size_threshold=MAX_FOLDED_BYTES, should_exclude_node=lambda node: node.op in keep)
    graph.cleanup()
    after = sum(1 for n in graph.nodes if n.op == "Constant")
    ctx.count(constant_nodes_folded=before - after)
    ctx.facts[CONSTANT_WEIGHTS] = True

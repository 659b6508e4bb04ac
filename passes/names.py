"""name-nodes: every node gets a unique, stable name, so that reports, --exclude patterns and
error messages can refer to it. Nodes that already have a unique name keep it."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import UNIQUE_NODE_NAMES
from ocs_onnx.pass_manager import GraphEffect, compiler_pass


@compiler_pass("name-nodes", produces=(UNIQUE_NODE_NAMES,), effect=GraphEffect.REWRITES)
def name_nodes(graph: gs.Graph, ctx: CompileContext) -> None:
    """Unique stable node names for the report and `--exclude`."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base = f"{node.op}_{index}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            renamed += 1
        seen.add(node.name)
    ctx.count(nodes_named=renamed)
    ctx.facts[UNIQUE_NODE_NAMES] = True

"""fuse-hardswish: the HardSwish that exporters spell out, ``x * Clip(x + 3, 0, 6) / 6``
(paddle2onnx does, 18 times in PP-OCRv5's classifier), becomes one op.

    x * clip(x + 3, 0, 6) / 6 = x * clip(x / 6 + 1/2, 0, 1) = HardSwish(x) = x * HardSigmoid(x; 1/6, 1/2)

Between two integer kernels each float op costs a pass over the tensor; four become one
(``HardSwish``, opset 14) or two (``HardSigmoid`` and ``Mul``, below opset 14). The result
differs from the spelled-out form by float rounding only.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import CONSTANT_WEIGHTS, HARDSWISH_FUSED
from ocs_onnx.pass_manager import GraphEffect, compiler_pass


def _scalar(t: gs.Tensor, rank: int | None = None) -> float | None:
    """The value of a one-element float constant that cannot raise the rank of a tensor of
    ``rank`` dimensions it is broadcast with (None: unknown, then rank 0 or 1 only)."""
    if not (isinstance(t, gs.Constant) and t.values.size == 1 and t.values.dtype.kind == "f"):
        return None
    if t.values.ndim > (1 if rank is None else max(rank, 1)):
        return None
    return float(t.values.reshape(-1)[0])


def _only_reader(t: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if len(t.outputs) != 1 or t.name in graph_outputs:
        return None
    return t.outputs[0]


def _clip_bounds(clip: gs.Node) -> tuple[float | None, float | None]:
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        return clip.attrs.get("min"), clip.attrs.get("max")
    bounds = [(_scalar(t, 0) if t.name else None) for t in clip.inputs[1:3]]
    return tuple(bounds + [None] * (2 - len(bounds)))


def match_hardswish(add: gs.Node, graph_outputs: set[str]) -> tuple[gs.Tensor, list[gs.Node], gs.Tensor] | None:
    """(x, the four nodes, the output) when ``add`` starts ``x * Clip(x + 3, 0, 6) / 6``."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    x = next((t for t in add.inputs if not isinstance(t, gs.Constant)), None)
    rank = len(x.shape) if x is not None and x.shape is not None else None
    three = next((_scalar(t, rank) for t in add.inputs if t is not x), None)
    if x is None or three != 3.0:
        return None
    clip = _only_reader(add.outputs[0], graph_outputs)
    if clip is None or clip.op != "Clip" or _clip_bounds(clip) != (0.0, 6.0):
        return None
    mul = _only_reader(clip.outputs[0], graph_outputs)
    if mul is None or mul.op != "Mul" or {id(t) for t in mul.inputs} != {id(x), id(clip.outputs[0])}:
        return None
    div = _only_reader(mul.outputs[0], graph_outputs)
    if div is None or div.op != "Div" or div.inputs[0] is not mul.outputs[0] or _scalar(div.inputs[1], rank) != 6.0:
        return None
    return x, [add, clip, mul, div], div.outputs[0]


@compiler_pass("fuse-hardswish", requires=(CONSTANT_WEIGHTS,), produces=(HARDSWISH_FUSED,),
               effect=GraphEffect.REWRITES)
def fuse_hardswish(graph: gs.Graph, ctx: CompileContext) -> None:
    """`x * Clip(x + 3, 0, 6) / 6` becomes HardSwish (below opset 14: HardSigmoid and Mul)."""
    graph_outputs = {t.name for t in graph.outputs}
    opset = graph.opset if isinstance(graph.opset, int) else 13
    fused = 0
    for node in list(graph.nodes):
        match = match_hardswish(node, graph_outputs)
        if match is None:
            continue
        x, nodes, y = match
        for old in nodes:
            old.inputs.clear()
            old.outputs.clear()
        if opset >= 14:
            graph.nodes.append(gs.Node("HardSwish", ctx.unique_name(f"{nodes[0].name}_hardswish"), inputs=[x], outputs=[y]))
        else:
            gate = gs.Variable(ctx.unique_name(f"{nodes[0].name}_hardsigmoid_out"), dtype=x.dtype, shape=x.shape)
            attrs = {"alpha": 1.0 / 6.0, "beta": 0.5}
            graph.nodes.append(gs.Node("HardSigmoid", ctx.unique_name(f"{nodes[0].name}_hardsigmoid"), attrs, [x], [gate]))
            graph.nodes.append(gs.Node("Mul", ctx.unique_name(f"{nodes[0].name}_hardswish"), inputs=[x, gate], outputs=[y]))
        fused += 1
    if fused:
        graph.cleanup().toposort()
    ctx.count(hardswish_fused=fused)
    ctx.facts[HARDSWISH_FUSED] = True

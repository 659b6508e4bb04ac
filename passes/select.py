"""select-layers: decides which layers are quantized and which of those may be split.

* Conv (group = 1), Gemm and MatMul whose weight input is a constant are quantized and split.
* Grouped and depthwise Conv are quantized but not split: an extra input channel would have to
  be added to every group (depthwise: a whole extra group), which is not what OCS's overhead
  figure counts and which the Conv's group structure cannot express for one channel alone.
* Everything else stays float, as do nodes matched by ``--exclude`` (glob on name or op type).
  Weighted layers of other kinds (ConvTranspose, recurrent layers), and layers inside If/Loop/Scan
  bodies or model-local functions, are listed in ``kept_float``.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    AFFINE_FOLDED,
    BATCHNORMS_FOLDED,
    CONSTANT_WEIGHTS,
    KEPT_FLOAT,
    LAYERS,
    LINEAR_CANONICAL,
    OPSET_13,
    UNIQUE_NODE_NAMES,
    Layer,
)
from ocs_onnx.pass_manager import compiler_pass

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
# Ops with weights that stay float. They are listed in the report's kept_float so that a user
# reading it sees every weighted layer and knows why it was not quantized.
WEIGHTED_OPS_KEPT_FLOAT = ("ConvTranspose", "LSTM", "GRU", "RNN")


def _weighted_ops_in(nodes, functions: dict[tuple[str, str], gs.Function], seen: frozenset = frozenset()) -> list[str]:
    """Op types of the layers (quantizable or weighted) among ``nodes``, inside their control-flow
    bodies and in the model-local functions they call, recursively."""
    found = []
    for node in nodes:
        if node.domain in (None, "", "ai.onnx") and node.op in (*QUANTIZABLE_OPS, *WEIGHTED_OPS_KEPT_FLOAT):
            found.append(node.op)
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                found += _weighted_ops_in(value.nodes, functions, seen)
        key = (node.domain or "", node.op)
        if key in functions and key not in seen:
            found += _weighted_ops_in(functions[key].nodes, functions, seen | {key})
    return found


def _layers_out_of_reach(graph: gs.Graph) -> dict[str, str]:
    """Top-level nodes that hold layers where this version does not quantize them: in the
    bodies of If/Loop/Scan, or in a model-local function. Listed in kept_float, so that the
    report accounts for every layer of the model."""
    functions = {(f.domain or "", f.name): f for f in graph.functions}
    kept = {}
    for node in graph.nodes:
        bodies = [value for value in node.attrs.values() if isinstance(value, gs.Graph)]
        key = (node.domain or "", node.op)
        if bodies:
            ops = _weighted_ops_in([n for body in bodies for n in body.nodes], functions)
            where = f"in the bodies of this {node.op} node"
        elif key in functions:
            ops = _weighted_ops_in(functions[key].nodes, functions, frozenset({key}))
            where = f"in the model-local function {key[0]}.{key[1]} it calls"
        else:
            continue
        if ops:
            counts = ", ".join(f"{ops.count(op)} {op}" for op in sorted(set(ops)))
            kept[node.name] = f"{counts} {where}: kept float (layers inside subgraphs and functions are not quantized)"
    return kept


def _excluded_by(node: gs.Node, patterns) -> str | None:
    for pattern in patterns:
        if fnmatchcase(node.name, pattern) or fnmatchcase(node.op, pattern):
            return pattern
    return None


def _weight_of(node: gs.Node) -> gs.Constant | None:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    if isinstance(node.inputs[0], gs.Constant):
        return None  # a constant data input would be folded; nothing to calibrate here
    return node.inputs[1]


def plan_layer(node: gs.Node, weight: gs.Constant) -> Layer | str:
    """The layer as it will be quantized, or the reason it stays float."""
    w = weight.values
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} (only float32 weights are quantized)"
    if w.size == 0:
        return "zero-sized weight"
    if not np.isfinite(w).all():
        return "weight contains NaN or Inf"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if isinstance(bias, gs.Constant) and bias.values.dtype.kind == "f" and not np.isfinite(bias.values).all():
        return "bias contains NaN or Inf (an int32 bias has no value for it)"
    if node.op == "Conv":
        if w.ndim < 3:
            return f"Conv weight of rank {w.ndim}"
        group = int(node.attrs.get("group", 1))
        refused = None
        if group > 1:
            kind = "depthwise" if w.shape[1] == 1 else f"grouped (group={group})"
            refused = f"{kind} Conv: a split channel would need a copy in every group"
        return Layer(node, weight, w, weight_in_axis=1, weight_out_axis=0, input_channel_axis=1, split_refused=refused)
    if w.ndim != 2:
        return f"{node.op} weight of rank {w.ndim} (only 2-D weights are quantized)"
    if node.op == "Gemm":
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        # B is (K, N), or (N, K) with transB; A is (M, K), or (K, M) with transA.
        return Layer(
            node,
            weight,
            w,
            weight_in_axis=1 if trans_b else 0,
            weight_out_axis=0 if trans_b else 1,
            input_channel_axis=0 if trans_a else 1,
        )
    # MatMul: y = x @ W with W (K, N); x's last axis is K.
    return Layer(node, weight, w, weight_in_axis=0, weight_out_axis=1, input_channel_axis=-1)


# names for --exclude and the report; weights as they will run, in initializers; opset 13
# for the per-channel DequantizeLinear the layers will get
@compiler_pass("select-layers",
               requires=(UNIQUE_NODE_NAMES, CONSTANT_WEIGHTS, BATCHNORMS_FOLDED, AFFINE_FOLDED, LINEAR_CANONICAL,
                         OPSET_13),
               produces=(LAYERS, KEPT_FLOAT))
def select_layers(graph: gs.Graph, ctx: CompileContext) -> None:
    """Conv (group 1), Gemm and MatMul with constant weights are quantized and splittable;
    grouped/depthwise Conv quantized, not split."""
    layers: list[Layer] = []
    kept_float: dict[str, str] = {}
    for node in graph.nodes:
        if node.domain not in (None, "", "ai.onnx"):  # a custom op may reuse a standard op's name
            continue
        if node.op in WEIGHTED_OPS_KEPT_FLOAT:
            kept_float[node.name] = f"{node.op} layers are not quantized by this version of ocs-onnx"
            continue
        if node.op not in QUANTIZABLE_OPS:
            continue
        weight = _weight_of(node)
        if weight is None:
            kept_float[node.name] = "no constant weight input"
            continue
        pattern = _excluded_by(node, ctx.config.exclude)
        if pattern is not None:
            kept_float[node.name] = f"excluded by --exclude {pattern}"
            continue
        layer = plan_layer(node, weight)
        ctx.done_with(weight.values)
        if isinstance(layer, str):  # a weight we cannot quantize: say so, the user expected it to be
            kept_float[node.name] = layer
            ctx.warn(f"layer {node.name} kept float: {layer}")
            continue
        if layer.splittable and len(weight.outputs) > 1:
            layer = replace(layer, split_refused=f"weight shared by {len(weight.outputs)} nodes")
        layers.append(layer)
    kept_float.update(_layers_out_of_reach(graph))
    ctx.facts[LAYERS] = layers
    ctx.facts[KEPT_FLOAT] = kept_float

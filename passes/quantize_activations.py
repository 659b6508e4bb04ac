"""quantize-activations: a QuantizeLinear/DequantizeLinear pair on every planned activation,
with parameters from its calibrated range, and int32 biases for the layers behind them.

Activations are uint8 with a zero point (``--activation-type uint8``, default) or int8 with
zero point 0. A bias is stored as int32 with scale = input scale x weight scale: that is the
form onnxruntime needs to fuse Conv into QLinearConv and Gemm into QGemm.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    LAYERS,
    QA_ACTIVATION_OFFSETS,
    QUANTIZED_ACTIVATIONS,
    QUANTIZED_WEIGHTS,
    WEIGHT_SCALES,
    WEIGHT_SPLITS,
    Layer,
)
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.quant import ActivationQParams

INT32_LIMIT = 2**31 - 1


def grid_limits(qp: ActivationQParams, bits: int) -> tuple[float, float]:
    """The smallest and largest value of a k-bit activation grid."""
    if qp.dtype == np.uint8:
        return qp.scale * (0 - qp.zero_point), qp.scale * (2**bits - 1 - qp.zero_point)
    qmax = 2 ** (bits - 1) - 1
    return -qp.scale * qmax, qp.scale * qmax


def _insert_qdq(
    graph: gs.Graph,
    ctx: CompileContext,
    tensor: gs.Tensor,
    qp: ActivationQParams,
    bits: int,
    consumers: list[gs.Node] | None = None,
) -> gs.Variable:
    """tensor -> Q -> DQ -> (every former consumer, or ``consumers``). Returns the dequantized
    tensor.

    A k-bit grid with k < 8 lives inside the 8-bit type, whose QuantizeLinear saturates at the
    8-bit limits only: a Clip to the k-bit grid in front makes values beyond it saturate where
    k-bit hardware would (and a clip threshold clip).
    """
    scale = gs.Constant(ctx.unique_name(f"{tensor.name}_scale"), np.asarray(qp.scale, dtype=np.float32))
    zero_point = gs.Constant(ctx.unique_name(f"{tensor.name}_zero_point"), np.asarray(qp.zero_point, dtype=qp.dtype))
    every_reader = consumers is None
    consumers = list(tensor.outputs) if every_reader else consumers
    quantized = gs.Variable(ctx.unique_name(f"{tensor.name}_quantized"), dtype=qp.dtype, shape=tensor.shape)
    dequantized = gs.Variable(ctx.unique_name(f"{tensor.name}_dequantized"), dtype=np.float32, shape=tensor.shape)
    to_quantize = tensor
    if bits < 8:
        lo, hi = grid_limits(qp, bits)
        to_quantize = gs.Variable(ctx.unique_name(f"{tensor.name}_clipped"), dtype=np.float32, shape=tensor.shape)
        limits = [
            gs.Constant(ctx.unique_name(f"{tensor.name}_grid_{edge}"), np.asarray(value, dtype=np.float32))
            for edge, value in (("min", lo), ("max", hi))
        ]
        graph.nodes.append(
            gs.Node(
                "Clip", ctx.unique_name(f"{tensor.name}_grid_clip"), inputs=[tensor, *limits], outputs=[to_quantize]
            )
        )
    graph.nodes.append(
        gs.Node(
            "QuantizeLinear",
            ctx.unique_name(f"{tensor.name}_quantize"),
            inputs=[to_quantize, scale, zero_point],
            outputs=[quantized],
        )
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            ctx.unique_name(f"{tensor.name}_dequantize"),
            inputs=[quantized, scale, zero_point],
            outputs=[dequantized],
        )
    )
    for consumer in consumers:
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = dequantized
    if every_reader and any(t is tensor for t in graph.outputs) and not any(t is tensor for t in graph.inputs):
        # A graph output keeps its name (in every place the model lists it): the dequantized
        # tensor takes it over. A graph input that is also an output keeps both roles: its
        # name is the model's interface, and the output is the input as given. A constant
        # quantized for some readers only stays what the graph outputs.
        original = tensor.name
        tensor.name = ctx.unique_name(f"{original}_before_quantize")
        dequantized.name = original
        graph.outputs = [dequantized if t is tensor else t for t in graph.outputs]
    return dequantized


def _reads_quantized(node: gs.Node, qparams: dict) -> bool:
    """Every activation input and the output of the node are quantized (before any pair is
    inserted: names as planned)."""
    activations = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    return all(t.name in qparams for t in activations) and node.outputs[0].name in qparams


def _quantize_bias(
    ctx: CompileContext, layer: Layer, out_channels: int, weight_scale: np.ndarray, input_scale: float
) -> gs.Node | None:
    """Replaces the layer's float bias by int32 + DequantizeLinear; returns that node."""
    node = layer.node
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return None
    if layer.op == "Gemm" and (node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return None  # QGemm's int32 bias has scale input x weight; alpha/beta would change that
    bias = node.inputs[2].values
    if bias.dtype != np.float32 or bias.shape != (out_channels,):
        return None
    # float32 product, as onnxruntime computes the accumulator scale.
    bias_scale = np.asarray(np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32), dtype=np.float32)
    levels = np.floor(bias.astype(np.float64) / bias_scale.astype(np.float64) + 0.5)
    if not np.abs(levels).max(initial=0) <= INT32_LIMIT:
        # clip-weights raised the weight scales so that every finite bias fits; a bias left float
        # here would be ignored by onnxruntime's fused kernels, a wrong model
        raise RuntimeError(f"layer {layer.name}: int32 bias overflows at the weight scale clip-weights chose")
    base = node.inputs[2].name
    inputs = [
        gs.Constant(ctx.unique_name(f"{base}_int32"), levels.astype(np.int32)),
        gs.Constant(ctx.unique_name(f"{base}_scale"), bias_scale),
        gs.Constant(ctx.unique_name(f"{base}_zero_point"), np.zeros(bias_scale.shape, dtype=np.int32)),
    ]
    out = gs.Variable(ctx.unique_name(f"{base}_dequantized"), dtype=np.float32, shape=[out_channels])
    node.inputs[2] = out
    attrs = {"axis": 0} if bias_scale.ndim == 1 else {}
    return gs.Node("DequantizeLinear", ctx.unique_name(f"{layer.name}_bias_dequantize"), attrs, inputs, [out])


# after the weights: an int32 bias has scale input x weight scale, and its layer reads the
# dequantized weight by then
@compiler_pass("quantize-activations",
               requires=(LAYERS, ACTIVATION_PLAN, ACTIVATION_QPARAMS, WEIGHT_SPLITS, WEIGHT_SCALES,
                         QUANTIZED_WEIGHTS, QA_ACTIVATION_OFFSETS),
               produces=(QUANTIZED_ACTIVATIONS,), effect=GraphEffect.EDITS)
def quantize_activations(graph: gs.Graph, ctx: CompileContext) -> None:
    """Q/DQ pairs on activations (below 8 bits behind a Clip to the k-bit grid); biases become
    int32 with scale = input scale x weight scale."""
    ctx.facts[QUANTIZED_ACTIVATIONS] = True
    if ctx.config.abits is None:
        return
    tensors = graph.tensors()
    input_scales: dict[str, float] = {}
    qparams, plan = ctx.facts[ACTIVATION_QPARAMS], ctx.facts[ACTIVATION_PLAN]
    nodes = {node.name: node for node in graph.nodes}
    # a scalar constant of integer ops is quantized for those ops alone (others read it as it is)
    constant_readers = {
        name: [nodes[n] for n in readers if n in nodes and _reads_quantized(nodes[n], qparams)]
        for name, readers in plan.constants.items()
    }
    # Graph order (the planned dict's insertion order follows the layers' order): deterministic.
    for name, qp in qparams.items():
        if name in constant_readers:
            _insert_qdq(graph, ctx, tensors[name], qp, ctx.config.abits, consumers=constant_readers[name])
            continue
        dequantized = _insert_qdq(graph, ctx, tensors[name], qp, ctx.config.abits)
        input_scales[dequantized.name] = qp.scale
    scales, splits = ctx.facts[WEIGHT_SCALES], ctx.facts[WEIGHT_SPLITS].layers
    for layer in ctx.facts[LAYERS]:
        x = layer.node.inputs[0]
        if x.name in input_scales:
            out_channels = splits[layer.name].constant.shape[layer.weight_out_axis]
            bias_node = _quantize_bias(ctx, layer, out_channels, scales[layer.name].scale, input_scales[x.name])
            if bias_node is not None:
                graph.nodes.append(bias_node)

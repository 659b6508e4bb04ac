"""plan-activations: which activation tensors get a QuantizeLinear/DequantizeLinear pair.

onnxruntime turns a layer into an integer kernel when its inputs come from DequantizeLinear and,
for Conv, its output goes into a QuantizeLinear (QLinearConv). MatMul and Gemm fuse with a
float output (MatMulIntegerToFloat, QGemm). So we quantize:

* the data input of every quantized layer (weight-ocs, which runs later, adds its Slice and
  Concat outputs with their input's parameters, so that onnxruntime drops the pairs around the
  Slices, runs the Concat as QLinearConcat, and moves 8-bit values);
* the output of every quantized Conv. When that output only feeds a Relu or Clip, the
  activation's output is quantized instead: with a uint8 zero point at the bottom of the
  range, onnxruntime removes the Relu/Clip and QLinearConv clamps for free.

With ``--int8-ops`` (the default) the int8 region then grows from those tensors through the ops
onnxruntime runs as integer kernels (residual Adds, SE Muls, pooling, Concat, Sigmoid) and the
data movement between them (``ocs_onnx/placement.py``). Other float ops read dequantized values
where they share a tensor with a quantized layer.

With ``--act-ratio``, the pass also lists the tensors activation OCS may split: a layer input
that only splittable layers read and that is quantized with its own statistics. A tensor that
another op also reads (a residual Add, a depthwise Conv), or that shares the parameters of a
tensor upstream, would still be quantized whole before the split, and splitting it would gain
nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import ACTIVATION_PLAN, HARDSWISH_FUSED, LAYERS, TENSOR_TYPES, ActivationPlan, Layer
from ocs_onnx.hessian import InputLayout
from ocs_onnx.overflow import is_depthwise
from ocs_onnx.pass_manager import compiler_pass
from ocs_onnx.placement import Placement, passes_through, place_integer_ops

# Activations onnxruntime folds into the quantization of the tensor after them.
FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
# Ops whose output holds a subset of their (first) input's values: they can run on 8-bit data.
DATA_MOVEMENT_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity")


def _is_float(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def _output_to_quantize(node: gs.Node, graph_outputs: set[str]) -> gs.Tensor:
    out = node.outputs[0]
    if out.name not in graph_outputs and len(out.outputs) == 1:
        consumer = out.outputs[0]
        clip_constant = all(isinstance(t, gs.Constant) for t in consumer.inputs[1:])
        if consumer.op in FOLDABLE_ACTIVATIONS and clip_constant:
            return consumer.outputs[0]
    return out


def _resolve_sources(
    planned: dict[str, str], tensors: dict[str, gs.Tensor], through_region: bool = False, placed: frozenset = frozenset()
) -> None:
    """Points every planned tensor at the tensor whose parameters it must share.

    Behind a data-movement op whose input is quantized anyway, a tensor holds a subset of that
    input's values: it takes the same parameters, so that onnxruntime drops the pair around the
    op and moves 8-bit data. A layer's own tensor never takes the parameters of a ``placed``
    one: calibration may keep those float, and the layer's input must stay quantized.
    """

    def source(name: str) -> str:
        producers = tensors[name].inputs
        if len(producers) == 1 and producers[0].op in DATA_MOVEMENT_OPS and producers[0].inputs[0].name in planned:
            return source(producers[0].inputs[0].name)
        if through_region and len(producers) == 1 and passes_through(producers[0]) and producers[0].inputs[0].name in planned:
            # an op the int8 region runs on 8-bit data (placement.PASS_THROUGH_OPS)
            return source(producers[0].inputs[0].name)
        return name

    for name in list(planned):
        resolved = source(name)
        if resolved in placed and name not in placed:
            continue
        planned[name] = resolved


@compiler_pass("plan-activations", requires=(LAYERS, TENSOR_TYPES, HARDSWISH_FUSED), produces=(ACTIVATION_PLAN,))
def plan_activations(graph: gs.Graph, ctx: CompileContext) -> None:
    """Which activations get QuantizeLinear/DequantizeLinear pairs (layer inputs, Conv outputs,
    and with `--int8-ops` the ops onnxruntime runs as integer kernels between them); with
    `--act-ratio`, which of them activation OCS may split."""
    layers = ctx.facts[LAYERS]
    layouts = input_layouts(layers) if ctx.config.reads_layer_inputs else {}
    if ctx.config.abits is None:
        ctx.facts[ACTIVATION_PLAN] = ActivationPlan({}, input_layouts=layouts)
        return
    graph_outputs = {t.name for t in graph.outputs}
    planned: dict[str, str] = {}
    for layer in layers:
        x = layer.node.inputs[0]
        if not _is_float(x):
            continue
        planned[x.name] = x.name
        if layer.op == "Conv":
            out = _output_to_quantize(layer.node, graph_outputs)
            if _is_float(out):
                planned[out.name] = out.name
    _resolve_sources(planned, graph.tensors())
    # Below 8 bits activations are emulated behind a Clip that onnxruntime cannot fuse: the ops
    # between layers would gain no integer kernel, only more quantization error (the demo at
    # W8A5: logit SQNR 28.4 dB with them, 31.5 without).
    placing = ctx.config.int8_ops and ctx.config.abits == 8
    placement = place_integer_ops(graph, planned) if placing else Placement()
    if placement.tensors:
        # after the layers' own tensors, in graph order: the order the pairs are inserted in
        planned.update(placement.tensors)
        # a layer input behind a data-movement op that the region quantizes shares its parameters
        _resolve_sources(planned, graph.tensors(), through_region=True, placed=frozenset(placement.tensors))
    candidates = _split_candidates(layers, planned, graph_outputs) if ctx.config.act_ratio > 0 else {}
    ctx.facts[ACTIVATION_PLAN] = ActivationPlan(
        planned,
        candidates,
        placed=tuple(placement.tensors),
        constants={name: tuple(nodes) for name, nodes in placement.constants.items()},
        integer_ops=placement.integer_ops,
        shared=tuple(placement.shared),
        channel_peak_inputs=_channel_peak_inputs(layers) if ctx.config.bounds_pair_sums else {},
        input_layouts=layouts,
    )


def input_layouts(layers: list[Layer]) -> dict[str, InputLayout]:
    """How each layer reads its input as rows of features, where ocs_onnx/hessian.py knows how:
    the last axis of a Gemm's or MatMul's input, a 2-D Conv's im2col patches (group 1, or
    depthwise: one channel per row)."""
    layouts = {}
    for layer in layers:
        node, x = layer.node, layer.node.inputs[0]
        if not _is_float(x):
            continue
        if layer.op in ("Gemm", "MatMul") and not node.attrs.get("transA", 0) and layer.input_channel_axis in (-1, len(x.shape or [0, 0]) - 1):
            layouts[layer.name] = InputLayout(x.name, "rows")
        elif layer.op == "Conv" and layer.model_weight.ndim == 4:
            group = node.attrs.get("group", 1)
            depthwise = is_depthwise(group, layer.model_weight.shape)
            pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
            if (group != 1 and not depthwise) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                continue  # a grouped Conv; SAME padding, where the pads go depends on the input size
            if len(pads) != 4:
                continue
            layouts[layer.name] = InputLayout(
                x.name, "depthwise2d" if depthwise else "conv2d",
                kernel=tuple(layer.model_weight.shape[2:]),
                strides=tuple(node.attrs.get("strides", (1, 1))),
                pads=pads,
                dilations=tuple(node.attrs.get("dilations", (1, 1))),
            )  # fmt: skip
    return layouts


def _channel_peak_inputs(layers: list[Layer]) -> dict[str, tuple[str, int]]:
    return {
        layer.name: (layer.node.inputs[0].name, layer.input_channel_axis)
        for layer in layers
        if _is_float(layer.node.inputs[0])
    }


def _split_candidates(
    layers: list[Layer], planned: dict[str, str], graph_outputs: set[str]
) -> dict[str, tuple[int, int]]:
    readers: dict[str, list[Layer]] = {}
    for layer in layers:
        readers.setdefault(layer.node.inputs[0].name, []).append(layer)
    candidates = {}
    for name, group in readers.items():
        x = group[0].node.inputs[0]
        layouts = {(layer.input_channel_axis, layer.model_weight.shape[layer.weight_in_axis]) for layer in group}
        private = len(x.outputs) == len(group) and all(layer.splittable for layer in group)
        if private and len(layouts) == 1 and planned.get(name) == name and name not in graph_outputs:
            candidates[name] = layouts.pop()
    return candidates

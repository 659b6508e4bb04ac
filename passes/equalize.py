"""equalize-layers (``--equalize``): cross-layer equalization (Nagel et al. 2019), data-free.

Where a layer's output channel c reaches the next layer's input channel c through nothing or a
positively homogeneous op (Relu, LeakyRelu: f(x / s) = f(x) / s for s > 0), the pair computes
the same function with the producer's row c and bias divided by s_c and the consumer's input
column c multiplied by s_c. With ``s_c = sqrt(r1_c / r2_c)`` (r1: the producer row's largest
|w|, r2: the consumer column's), both become ``sqrt(r1_c r2_c)``: one channel's weights stop
setting the grid of a whole tensor (per-tensor scales), and the activation between the two
shrinks where the producer's rows were large. Sweeps repeat over all pairs until the scales
settle (a layer between two others is equalized on both sides).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import AFFINE_FOLDED, BATCHNORMS_FOLDED, CONSTANT_WEIGHTS, EQUALIZED, LINEAR_CANONICAL
from ocs_onnx.gs_adapter import constant_array
from ocs_onnx.pass_manager import GraphEffect, compiler_pass

HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu"})
MAX_SWEEPS = 8
# a sweep whose largest scale is within this of 1 changes nothing worth another
SETTLED = 1e-3


def equalization_scales(producer_rows: np.ndarray, consumer_columns: np.ndarray) -> np.ndarray:
    """s_c = sqrt(r1_c / r2_c), 1 where either range is 0 (a dead channel stays as it is)."""
    r1 = np.asarray(producer_rows, dtype=np.float64)
    r2 = np.asarray(consumer_columns, dtype=np.float64)
    scales = np.ones_like(r1)
    alive = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    scales[alive] = np.sqrt(r1[alive] / r2[alive])
    return scales


def _output_axis(node: gs.Node) -> int | None:
    """The axis of the node's weight that holds its output channels."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul" and node.inputs[1].shape is not None and len(node.inputs[1].shape) == 2:
        return 1
    return None


def _input_axis(node: gs.Node) -> int | None:
    """The axis of the node's weight that holds its input channels (None: not a plain layer,
    e.g. a grouped Conv, where input channel c is not a column of every filter)."""
    if node.op == "Conv":
        return 1 if node.attrs.get("group", 1) == 1 else None
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    if node.op == "MatMul" and node.inputs[1].shape is not None and len(node.inputs[1].shape) == 2:
        return 0
    return None


def _own_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1 and tensor.values.dtype == np.float32


def find_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(producer, consumer) layers joined channel to channel through at most one homogeneous op."""
    outputs = {t.name for t in graph.outputs}
    pairs = []
    for producer in graph.nodes:
        if producer.op not in ("Conv", "Gemm", "MatMul") or _output_axis(producer) is None:
            continue
        if len(producer.inputs) < 2 or not _own_constant(producer.inputs[1]):
            continue
        if len(producer.inputs) > 2 and producer.inputs[2].name and not _own_constant(producer.inputs[2]):
            continue
        tensor = producer.outputs[0]
        if len(tensor.outputs) != 1 or tensor.name in outputs:
            continue
        consumer = tensor.outputs[0]
        between = tensor
        if consumer.op in HOMOGENEOUS_OPS:
            between = consumer.outputs[0]
            if len(between.outputs) != 1 or between.name in outputs:
                continue
            consumer = between.outputs[0]
        if consumer.op not in ("Conv", "Gemm", "MatMul") or _input_axis(consumer) is None:
            continue
        if (producer.op == "Conv") != (consumer.op == "Conv"):
            continue  # a Conv's channels are axis 1, a MatMul's features the last axis: not the same channel
        if len(consumer.inputs) < 2 or consumer.inputs[0] is not between or not _own_constant(consumer.inputs[1]):
            continue
        channels = producer.inputs[1].shape[_output_axis(producer)]
        if consumer.inputs[1].shape[_input_axis(consumer)] != channels:
            continue
        pairs.append((producer, consumer))
    return pairs


def _moved(values: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)


def equalize_pair(producer: gs.Node, consumer: gs.Node) -> float:
    """Rescales one pair in place; returns the largest |log s| applied."""
    out_axis, in_axis = _output_axis(producer), _input_axis(consumer)
    w1 = constant_array(producer.inputs[1]).astype(np.float64)
    w2 = constant_array(consumer.inputs[1]).astype(np.float64)
    scales = equalization_scales(np.abs(_moved(w1, out_axis)).max(axis=1), np.abs(_moved(w2, in_axis)).max(axis=1))
    shape1, shape2 = [1] * w1.ndim, [1] * w2.ndim
    shape1[out_axis], shape2[in_axis] = -1, -1
    producer.inputs[1].values = (w1 / scales.reshape(shape1)).astype(np.float32)
    consumer.inputs[1].values = (w2 * scales.reshape(shape2)).astype(np.float32)
    if len(producer.inputs) > 2 and producer.inputs[2].name:
        bias = constant_array(producer.inputs[2]).astype(np.float64)
        producer.inputs[2].values = (bias / scales).astype(np.float32)
    return float(np.abs(np.log(scales)).max(initial=0.0))


@compiler_pass(
    "equalize-layers",
    requires=(CONSTANT_WEIGHTS, BATCHNORMS_FOLDED, AFFINE_FOLDED, LINEAR_CANONICAL),
    produces=(EQUALIZED,),
    effect=GraphEffect.EDITS,
)
def equalize_layers(graph: gs.Graph, ctx: CompileContext) -> None:
    """`--equalize`: cross-layer equalization of layer pairs joined through Relu, LeakyRelu or nothing (same
    function, balanced weight ranges)"""
    equalized: dict[str, str] = {}
    ctx.facts[EQUALIZED] = equalized
    if not ctx.config.equalize:
        return
    pairs = find_pairs(graph)
    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1):
        if max((equalize_pair(p, c) for p, c in pairs), default=0.0) < SETTLED:
            break
    for producer, consumer in pairs:
        equalized[producer.name] = consumer.name
    ctx.count(pairs_equalized=len(pairs), equalization_sweeps=sweeps if pairs else 0)

"""Where int8 goes beyond the layers: the ops onnxruntime runs in integer arithmetic when their
inputs come from DequantizeLinear and their output goes into QuantizeLinear.

onnxruntime's QDQ transformer fuses ``DQ -> op -> Q`` into one integer kernel for the ops of
``INTEGER_OPS`` (checked on the graph it optimizes into, ``tests/test_placement.py``), and
drops the pair around the ops of ``PASS_THROUGH_OPS`` when both sides share one scale and zero
point: they then move (or pick among) 8-bit values. Quantizing only the layers leaves every
such op in float between a DequantizeLinear and a fresh QuantizeLinear: two passes over the
tensor and a float op where one integer kernel would do.

The int8 region grows from the tensors the layers quantize anyway, in graph order:

* a pass-through op whose input is in the region puts its output there, with its input's
  parameters;
* an integer op goes into the region when each of its inputs is in the region, is a broadcast
  input (an SE gate) computed by an elementwise float op (``ELEMENTWISE_FLOAT_OPS``) from a
  tensor in the region, or is a scalar constant (Add and Mul only); its inputs and output are
  then quantized.

Nothing else is: the arithmetic of normalizations (ReduceMean, Sub, Pow, Sqrt, Div of two
activations), Softmax and what feeds it, attention scores (a MatMul of two activations), graph
outputs. After calibration, ``clip-activations`` keeps float whatever the statistics speak
against (``keep_float_reason``): a range that a masking constant dominates, or a quantization
error far above the model's other activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class IntegerOp:
    kernel: str  # what onnxruntime's CPU provider runs the fused group as
    all_inputs: bool  # every input is data (else the first only; the rest must be constants)
    scalar_constants: bool = False  # a scalar constant input is quantized with it


INTEGER_OPS = {
    "Add": IntegerOp("QLinearAdd", all_inputs=True, scalar_constants=True),
    "Mul": IntegerOp("QLinearMul", all_inputs=True, scalar_constants=True),
    "Concat": IntegerOp("QLinearConcat", all_inputs=True),
    "GlobalAveragePool": IntegerOp("QLinearGlobalAveragePool", all_inputs=False),
    "AveragePool": IntegerOp("QLinearAveragePool", all_inputs=False),
    "Sigmoid": IntegerOp("QLinearSigmoid", all_inputs=False),
    "LeakyRelu": IntegerOp("QLinearLeakyRelu", all_inputs=False),
}

# Ops whose output holds (a subset, or for Resize's linear mode a convex mix) of their first
# input's values: with the same parameters on both sides they run on 8-bit data.
PASS_THROUGH_OPS = frozenset(
    {"MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Identity"}
)

# Float ops whose output is a plain activation of their input: an integer op may read it
# quantized (one QuantizeLinear after the float op) when their input is in the region.
ELEMENTWISE_FLOAT_OPS = frozenset({"HardSigmoid", "HardSwish", "Relu", "Clip", "Tanh", "Sigmoid", "LeakyRelu"})

# An input at least this many times smaller than the op's output counts as a broadcast input.
BROADCAST_FACTOR = 8

# A tensor whose calibrated range reaches this is dominated by a masking constant (-3.4e38
# added before a Softmax, say): quantized, every real value would round to one level.
MASKING_MAGNITUDE = 1e30


@dataclass
class Placement:
    """What the region adds to the layers' plan: tensors {name: tensor whose statistics it
    uses}, scalar constants {name: the integer ops that read them quantized}, and the integer
    ops {node: (kernel, the activations it reads and writes)}."""

    tensors: dict[str, str] = field(default_factory=dict)
    constants: dict[str, list[str]] = field(default_factory=dict)
    integer_ops: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # tensors that must share one scale and zero point: a Concat's inputs and output (with one
    # scale QLinearConcat copies bytes; with several it requantizes every input)
    shared: list[tuple[str, ...]] = field(default_factory=list)


def _is_float(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) == np.float32
    except TypeError:  # an Optional's or a sequence's type
        return False


def _is_scalar_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and _is_float(t) and t.values.size == 1 and np.isfinite(t.values).all()


def _much_smaller(t: gs.Tensor, out: gs.Tensor) -> bool:
    """A broadcast input (an SE gate [N, C, 1, 1] of a [N, C, H, W] product, say): one more
    QuantizeLinear on it costs next to nothing. A full-size one costs a pass over the tensor,
    about what the integer op saves (measured on PP-OCRv5's detector: 0.70x of float with its
    affine blocks after HardSwish left float, 0.76x with them integer)."""
    if t.shape is None or out.shape is None or len(t.shape) > len(out.shape):
        return False
    factor = 1
    for small, large in zip(reversed(t.shape), reversed(out.shape)):
        if small == large:
            continue  # the same size, static or symbolic (the batch)
        if small != 1:
            return False
        # a dynamic size broadcast from 1 (the height of an image of any size): taken as large
        factor *= large if isinstance(large, int) else BROADCAST_FACTOR
    for large in out.shape[: len(out.shape) - len(t.shape)]:
        factor *= large if isinstance(large, int) else BROADCAST_FACTOR
    return factor >= BROADCAST_FACTOR


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes, producers before consumers (Kahn), without reordering the graph."""
    produced_by = {id(t): node for node in graph.nodes for t in node.outputs}
    waiting = {id(node): sum(1 for t in node.inputs if id(t) in produced_by) for node in graph.nodes}
    consumers: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if id(t) in produced_by:
                consumers.setdefault(id(produced_by[id(t)]), []).append(node)
    ready = [node for node in graph.nodes if waiting[id(node)] == 0]
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for consumer in consumers.get(id(node), []):
            waiting[id(consumer)] -= 1
            if waiting[id(consumer)] == 0:
                ready.append(consumer)
    return order


def passes_through(node: gs.Node) -> bool:
    if node.op not in PASS_THROUGH_OPS or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
        return False
    if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
        return False  # cubic interpolation overshoots its inputs' range
    if node.op == "MaxPool" and len(node.outputs) > 1:
        return False  # the indices output
    # shape, indices, axes and scales inputs are constants (or absent)
    return all(t.name == "" or isinstance(t, gs.Constant) for t in node.inputs[1:])


def place_integer_ops(graph: gs.Graph, planned: dict[str, str]) -> Placement:
    """Grows the int8 region from ``planned`` (the layers' tensors, {name: statistics source})."""
    graph_outputs = {t.name for t in graph.outputs}
    region = dict(planned)  # name -> source of its parameters
    placement = Placement()

    def source(t: gs.Tensor, out: gs.Tensor) -> str | None:
        if t.name in region:
            return region[t.name]
        producers = t.inputs
        if (
            len(producers) == 1
            and producers[0].op in ELEMENTWISE_FLOAT_OPS
            and producers[0].inputs
            and producers[0].inputs[0].name in region
            and _is_float(t)
            and _much_smaller(t, out)
        ):
            return t.name  # quantized after the float op, with its own statistics
        return None

    def add(t: gs.Tensor, statistics_of: str) -> None:
        if t.name not in region:
            region[t.name] = statistics_of
            placement.tensors[t.name] = statistics_of

    for node in topological_order(graph):
        if node.domain not in (None, "", "ai.onnx") or not node.outputs:
            continue
        out = node.outputs[0]
        if not _is_float(out) or out.name in graph_outputs:
            continue
        if passes_through(node):
            x = node.inputs[0]
            if x.name in region and out.name not in region:
                add(out, region[x.name])
            continue
        op = INTEGER_OPS.get(node.op)
        if op is None or len(node.outputs) != 1:
            continue
        data = node.inputs if op.all_inputs else node.inputs[:1]
        if not op.all_inputs and not all(t.name == "" or isinstance(t, gs.Constant) for t in node.inputs[1:]):
            continue
        activations = [t for t in data if not isinstance(t, gs.Constant)]
        constants = [t for t in data if isinstance(t, gs.Constant)]
        if not activations or (constants and not op.scalar_constants):
            continue
        if not all(_is_scalar_constant(c) for c in constants) or not all(_is_float(t) for t in activations):
            continue
        sources = [source(t, out) for t in activations]
        if any(s is None for s in sources):
            continue
        for t, s in zip(activations, sources):
            add(t, s)
        for c in constants:
            placement.constants.setdefault(c.name, []).append(node.name)
        add(out, out.name)  # unless a layer quantizes it already
        placement.integer_ops[node.name] = (op.kernel, tuple(t.name for t in activations) + (out.name,))
        if node.op == "Concat":
            placement.shared.append(tuple(t.name for t in activations) + (out.name,))
    return placement


def keep_float_reason(value_range: tuple[float, float], sqnr_db: float | None, typical_sqnr_db: float | None,
                      margin_db: float | None) -> str | None:
    """Why a tensor the region added stays float after calibration, or None to quantize it."""
    lo, hi = value_range
    if not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) >= MASKING_MAGNITUDE:
        return f"range [{lo:.3g}, {hi:.3g}]: a masking constant would take the whole grid"
    if margin_db is not None and sqnr_db is not None and typical_sqnr_db is not None:
        if sqnr_db < typical_sqnr_db - margin_db:
            return (
                f"estimated quantization SQNR {sqnr_db:.1f} dB, more than {margin_db:g} dB below the "
                f"median {typical_sqnr_db:.1f} dB of the layers' activations"
            )
    return None


def median(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(finite)) if finite else None

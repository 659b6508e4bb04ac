"""How much each quantized tensor costs the model's outputs, and the fewest to keep float for a
target output SQNR.

A *candidate* is what can be kept float as one: a layer's weight, or a group of activations that
share one set of quantization parameters (a tensor and the data-movement ops and Concat inputs
behind it: keeping one of them float while the others quantize its values again to the same
grid would change nothing). Each candidate has one or more *sites*, a dequantized tensor and the
float tensor it stands for.

The analysis runs the quantized graph as a *switched* model: every activation site reads
``float + m * (dequantized - float)`` with ``m`` a scalar input of its candidate, 1 quantized,
0 float (a layer reading a weight candidate computes its output from both weights and mixes
the outputs alike: ``layer_switched_model``). One onnxruntime session then measures any mix of quantized and float candidates: the
output SQNR of each candidate alone against the float model (its sensitivity) takes one run of
the held-out samples per candidate, with no session per candidate. The switches follow the QDQ
arithmetic (no integer kernels fuse around them); the search for the fewest float candidates
checks each choice on the model itself, with the kernels onnxruntime will serve it with
(``bypassed_model``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

WEIGHT = "weight"
ACTIVATION = "activation"


@dataclass(frozen=True)
class Site:
    """A quantized tensor as the graph reads it, and the float tensor it stands for (a tensor
    of the graph, or for a weight a constant fed beside the inputs)."""

    dequantized: str
    float_value: str


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # WEIGHT or ACTIVATION
    sites: tuple[Site, ...]
    # the layers reading the weight, or the activations as the report names them
    members: tuple[str, ...]
    # weight elements kept in float if the candidate is (0 for activations)
    parameters: int = 0


class OutputError:
    """The SQNR of outputs against reference outputs, accumulated over runs: the signal energy
    of each reference once, the noise energy of every run against it."""

    def __init__(self, references: Sequence[dict[str, np.ndarray]]):
        self.references = [
            {name: np.ascontiguousarray(value, dtype=np.float32).ravel() for name, value in run.items()}
            for run in references
        ]
        self.signal: dict[str, float] = {}
        for run in self.references:
            for name, value in run.items():
                finite = np.isfinite(value)
                self.signal[name] = self.signal.get(name, 0.0) + _energy(np.where(finite, value, 0.0))

    def sqnr_db(self, outputs: Sequence[dict[str, np.ndarray]]) -> float:
        """The worst output's SQNR (dB; inf where every output matches exactly, -inf where one
        is NaN or Inf where the reference is finite) for ``outputs``, run by run."""
        noise = dict.fromkeys(self.signal, 0.0)
        for run, reference in zip(outputs, self.references):
            for name, expected in reference.items():
                difference = expected - np.asarray(run[name], dtype=np.float32).ravel()
                energy = _energy(difference)
                if not math.isfinite(energy):  # only where the reference is finite counts
                    energy = _energy(np.where(np.isfinite(expected), difference, 0.0))
                    energy = math.inf if not math.isfinite(energy) else energy
                noise[name] += energy
        worst = math.inf
        for name, signal in self.signal.items():
            if noise[name] == 0.0:
                continue
            worst = min(worst, -math.inf if signal == 0.0 or noise[name] == math.inf else 10 * math.log10(signal / noise[name]))
        return worst


def _energy(values: np.ndarray) -> float:
    """Sum of squares, accumulated in float64 block by block (float32 dot products are fast,
    and exact enough within a block)."""
    block = 1 << 16
    return float(sum(np.float64(np.dot(values[i : i + block], values[i : i + block])) for i in range(0, values.size, block)))


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {output: index for index, node in enumerate(graph.node) for output in node.output}


def switched_model(model: onnx.ModelProto, candidates: Sequence[Candidate]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` in which every site of candidate i (activations: their float values
    are tensors of the model) reads ``float + switch_i * (dequantized - float)``; returns it and
    the names of the switch inputs (scalar floats)."""
    switched = onnx.ModelProto()
    switched.CopyFrom(model)
    graph = switched.graph
    producers = _producers(graph)
    after: dict[int, list[onnx.NodeProto]] = {}
    switches = []
    for index, candidate in enumerate(candidates):
        switch = f"ocs_switch/{index}"
        switches.append(switch)
        graph.input.append(helper.make_tensor_value_info(switch, onnx.TensorProto.FLOAT, []))
        for site in candidate.sites:
            producer = producers[site.dequantized]
            node = graph.node[producer]
            quantized = f"{site.dequantized}/quantized"
            node.output[list(node.output).index(site.dequantized)] = quantized
            error, scaled = f"{site.dequantized}/error", f"{site.dequantized}/switched_error"
            after.setdefault(producer, []).extend(
                [
                    helper.make_node("Sub", [quantized, site.float_value], [error]),
                    helper.make_node("Mul", [error, switch], [scaled]),
                    helper.make_node("Add", [site.float_value, scaled], [site.dequantized]),
                ]
            )
    nodes = []
    for index, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(index, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return switched, switches


def layer_switched_model(
    model: onnx.ModelProto, candidates: Sequence[Candidate], values: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` in which every layer reading the weight of candidate i computes its
    output twice, from the float weight and from the dequantized one (both constants, as
    onnxruntime prepacks them), and passes on ``float + switch_i * (quantized - float)``.
    ``values`` holds, per weight site's float value name, (float weight, dequantized weight).
    Switching the weights themselves would make them run-time tensors, and every layer slower
    than its two constant-weight copies together."""
    switched = onnx.ModelProto()
    switched.CopyFrom(model)
    graph = switched.graph
    switches, nodes, readers = [], [], {}
    for index, candidate in enumerate(candidates):
        switch = f"ocs_switch/{index}"
        switches.append(switch)
        graph.input.append(helper.make_tensor_value_info(switch, onnx.TensorProto.FLOAT, []))
        for site in candidate.sites:
            float_weight, dequantized_weight = values[site.float_value]
            quantized_name = f"{site.float_value}/dequantized"
            graph.initializer.append(onnx.numpy_helper.from_array(float_weight, site.float_value))
            graph.initializer.append(onnx.numpy_helper.from_array(dequantized_weight, quantized_name))
            readers[site.dequantized] = (switch, site.float_value, quantized_name)
    for node in graph.node:
        weight = next((name for name in node.input if name in readers), None)
        if weight is None or len(node.output) != 1:
            nodes.append(node)
            continue
        switch, float_name, quantized_name = readers[weight]
        output = node.output[0]
        for variant, name in (("float", float_name), ("quantized", quantized_name)):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}/{variant}"
            copy.input[list(copy.input).index(weight)] = name
            copy.output[0] = f"{output}/{variant}"
            nodes.append(copy)
        nodes.extend(
            [
                helper.make_node("Sub", [f"{output}/quantized", f"{output}/float"], [f"{output}/error"]),
                helper.make_node("Mul", [f"{output}/error", switch], [f"{output}/switched_error"]),
                helper.make_node("Add", [f"{output}/float", f"{output}/switched_error"], [output]),
            ]
        )
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_dead_nodes(graph)
    return switched, switches


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """``model`` (edited in place) with the tensors ``names`` among its outputs."""
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            outputs.add(name)
    return model


def bypassed_model(
    model: onnx.ModelProto, kept_float: Iterable[Candidate], float_values: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` in which the sites of ``kept_float`` read their float values (weights
    from ``float_values``, as initializers, so that onnxruntime folds and prepacks them as it
    would in the written model), and the Q/DQ nodes nothing reads any more are gone."""
    bypassed = onnx.ModelProto()
    bypassed.CopyFrom(model)
    graph = bypassed.graph
    renamed = {site.dequantized: site.float_value for c in kept_float for site in c.sites}
    if not renamed:
        return bypassed
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(_producers(graph))
    for name in sorted(set(renamed.values()) - known):
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray((float_values or {})[name]), name))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    outputs = {o.name for o in graph.output}
    for dequantized, value in renamed.items():
        if dequantized in outputs:  # the output keeps its name
            graph.node.append(helper.make_node("Identity", [value], [dequantized]))
            for i, node in enumerate(graph.node):
                if dequantized in node.output and node.op_type != "Identity":
                    node.output[list(node.output).index(dequantized)] = f"{dequantized}/unused"
    _remove_dead_nodes(graph)
    return bypassed


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(node.input)
            for attribute in node.attribute:  # a subgraph may read outer tensors
                for subgraph in [attribute.g, *attribute.graphs]:
                    needed.update(name for n in subgraph.node for name in n.input)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    used = needed | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fewest_prefix(meets: Callable[[int], bool], count: int) -> int | None:
    """The smallest k in 0..count for which ``meets(k)`` holds, found by doubling k and then
    halving the last interval (about 2 log2 k calls), for a ``meets`` that holds from some k on
    (keeping more of the most sensitive candidates float does not lower the output SQNR, to
    within the held-out samples' noise; the k returned was itself checked). None when
    ``meets(count)`` does not hold."""
    if meets(0):
        return 0
    low, high = 0, 1  # meets(low) fails; high is the next to try
    while high < count and not meets(high):
        low, high = high, min(2 * high, count)
    if high >= count:
        if not meets(count):
            return None
        high = count
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return high

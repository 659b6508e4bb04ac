"""clip-activations: the quantization parameters of every planned activation, from its
calibrated range, clipped by ``--aclip`` on its calibration histogram.

The clip methods work on the histogram of |x|; the threshold alpha then narrows the range to
[max(lo, -alpha), min(hi, alpha)]. For a tensor that is never negative (a Relu output) on a uint8
grid, ``mse`` searches the unsigned grid of 2^k - 1 steps over [0, alpha]; the other methods
assume the symmetric grid and so clip a little more than that grid would need.

The pass also estimates each activation's SQNR under its final parameters on the histogram,
for the report.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.activations import activation_qparams, clipped_activation
from ocs_onnx.context import CompileContext
from ocs_onnx.facts import (
    ACTIVATION_CLIPPING,
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    ACTIVATION_SPLITS,
    ACTIVATION_STATISTICS,
    WEIGHT_SPLITS,
    ActivationClipping,
    activations_to_quantize,
    observed,
)
from ocs_onnx.histogram import merged_histogram
from ocs_onnx.pass_manager import compiler_pass
from ocs_onnx.placement import keep_float_reason, median


def _clip(sources: list[str], value_range, histogram, clipping: ActivationClipping, config) -> None:
    """The clipped range (and threshold, and estimated SQNR) that ``sources`` get, from their
    range and histogram."""
    clipped = clipped_activation(value_range, histogram, config)
    for source in sources:
        if clipped.threshold is not None:
            clipping.thresholds[source] = clipped.threshold
        clipping.clipped_ranges[source] = clipped.range
        if clipped.sqnr_db is not None:
            clipping.sqnr_db[source] = clipped.sqnr_db


def _shared_sources(plan, tensors: dict[str, str], kept_float: dict[str, str]) -> list[list[str]]:
    """The statistics sources that must share parameters (``plan.shared``, joined where groups
    overlap), without those kept float."""
    parent: dict[str, str] = {}

    def root(source: str) -> str:
        while parent.setdefault(source, source) != source:
            source = parent[source]
        return source

    for group in plan.shared:
        sources = [tensors[t] for t in group if t in tensors and tensors[t] not in kept_float]
        for source in sources[1:]:
            parent[root(source)] = root(sources[0])
    groups: dict[str, list[str]] = {}
    for source in list(parent):
        groups.setdefault(root(source), []).append(source)
    return [members for members in groups.values() if len(members) > 1]


def _kept_float(plan, tensors, statistics, splits, clipping: ActivationClipping, config) -> dict[str, str]:
    """The tensors the int8 placement added that their statistics keep float, and why."""
    placed = {tensors[t] for t in plan.placed if tensors.get(t) == t}  # placed with statistics of their own
    typical = median(s for source, s in clipping.sqnr_db.items() if source not in placed)
    kept = {}
    for source in placed:
        (lo, hi), _ = observed(source, statistics, splits)
        reason = keep_float_reason((lo, hi), clipping.sqnr_db.get(source), typical, config.int8_error_margin_db)
        if reason is not None:
            kept[source] = reason
    return kept


def _constants_still_read_quantized(plan, qparams: dict, graph: gs.Graph) -> list[str]:
    """The placed scalar constants whose integer op still has every activation input quantized."""
    nodes = {node.name: node for node in graph.nodes}
    kept = []
    for name, readers in plan.constants.items():
        for reader in readers:
            node = nodes.get(reader)
            if node is None:
                continue
            activations = [t for t in node.inputs if not isinstance(t, gs.Constant)]
            if all(t.name in qparams for t in activations) and node.outputs[0].name in qparams:
                kept.append(name)
                break
    return kept


@compiler_pass("clip-activations",
               requires=(ACTIVATION_PLAN, ACTIVATION_STATISTICS, ACTIVATION_SPLITS, WEIGHT_SPLITS),
               produces=(ACTIVATION_QPARAMS, ACTIVATION_CLIPPING))
def clip_activations(graph: gs.Graph, ctx: CompileContext) -> None:
    """Activation ranges clipped by `--aclip` on the calibration histograms; Q/DQ parameters."""
    config = ctx.config
    clipping = ActivationClipping({}, {}, {})
    qparams = {}
    if config.abits is not None:
        splits, statistics = ctx.facts[ACTIVATION_SPLITS], ctx.facts[ACTIVATION_STATISTICS]
        tensors = activations_to_quantize(ctx.facts[ACTIVATION_PLAN], splits, ctx.facts[WEIGHT_SPLITS])
        for source in dict.fromkeys(tensors.values()):
            _clip([source], *observed(source, statistics, splits), clipping, config)
        plan = ctx.facts[ACTIVATION_PLAN]
        clipping.kept_float.update(_kept_float(plan, tensors, statistics, splits, clipping, config))
        for group in _shared_sources(plan, tensors, clipping.kept_float):
            observations = [observed(source, statistics, splits) for source in group]
            union = (min(lo for (lo, _), _ in observations), max(hi for (_, hi), _ in observations))
            histograms = [h for _, h in observations if h is not None]
            _clip(group, union, merged_histogram(histograms) if histograms else None, clipping, config)
        for name, source in tensors.items():
            if source in clipping.kept_float:
                continue
            lo, hi = clipping.clipped_ranges[source]
            qparams[name] = activation_qparams(lo, hi, config.abits, config.activation_type)
        graph_tensors = graph.tensors()
        for name in _constants_still_read_quantized(plan, qparams, graph):
            values = graph_tensors[name].values
            lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
            qparams[name] = activation_qparams(lo, hi, config.abits, config.activation_type)
    ctx.facts[ACTIVATION_CLIPPING] = clipping
    ctx.facts[ACTIVATION_QPARAMS] = qparams

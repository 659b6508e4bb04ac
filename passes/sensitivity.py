"""analyze-sensitivity and keep-sensitive-float: what each quantized tensor costs the model's
outputs on held-out calibration samples, and, for ``--target-sqnr``, the fewest of them to keep
float so that the output SQNR against the float model reaches the target.

The candidates are the layers' weights and the groups of activations sharing one set of
parameters (``ocs_onnx/sensitivity.py``). Each is measured alone against the float model
(``--sensitivity``, or implied by the target): one run of the held-out samples per candidate in
one session. With a target, the candidates are kept float most sensitive first, as few as the
target allows (the output SQNR checked on the compiled model as onnxruntime serves it, integer
kernels and all). A target that needs every activation float, or half the weights, is not met:
that model is not the quantized model asked for (exit 7, nothing written).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocs_onnx import owned
from ocs_onnx.calibration import prepare_feed
from ocs_onnx.context import CompileContext
from ocs_onnx.errors import AccuracyTargetError, UnsupportedModelError, UsageError
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_QPARAMS,
    ACTIVATION_SPLITS,
    FLOAT_RUN,
    LAYERS,
    QUANTIZED_ACTIVATIONS,
    QUANTIZED_WEIGHTS,
    SENSITIVITY,
    WEIGHT_SPLITS,
    FloatRun,
    Sensitivity,
    activations_to_quantize,
)
from ocs_onnx.gs_adapter import constant_array, graph_to_model
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.placement import PASS_THROUGH_OPS
from ocs_onnx.progress import progress
from ocs_onnx.sensitivity import (
    ACTIVATION,
    WEIGHT,
    Candidate,
    OutputError,
    Site,
    bypassed_model,
    fewest_prefix,
    layer_switched_model,
    switched_model,
    with_outputs,
)
from ocs_onnx.sessions import BASIC_OPTIMIZATION, FULL_OPTIMIZATION, new_session


# The candidates are ranked on the first of the held-out samples: the ranking needs an order,
# not a precise figure, and costs one run of these samples per candidate (on PP-OCRv5 rec, 135
# candidates: 8 samples take 2x the plain compile, 4 about 1x). At most 4, and no more than
# hold 2^18 input values together (rec's lines of 3 x 48 x 320: 4; det's 3 x 640 x 640 pages: 1):
# the run time of a sample grows with its size. The target is checked on all of them.
RANKING_SAMPLES = 4
RANKING_INPUT_VALUES = 2**18


def ranking_samples(held_out_samples: int, values_per_sample: float) -> int:
    """How many of the held-out samples rank the candidates."""
    by_size = int(RANKING_INPUT_VALUES // max(values_per_sample, 1))
    return max(1, min(RANKING_SAMPLES, held_out_samples, by_size))


def _weight_candidates(ctx: CompileContext) -> tuple[list[Candidate], dict[str, np.ndarray]]:
    """One candidate per quantized weight (a weight several layers share is one), and the float
    weight each would read instead: the layer's weight after OCS, which computes the same
    function as the model's."""
    splits = ctx.facts[WEIGHT_SPLITS].layers
    readers: dict[str, list[str]] = {}
    for layer in ctx.facts[LAYERS]:
        weight = layer.node.inputs[1]
        producer = weight.inputs[0] if weight.inputs else None
        if producer is not None and producer.op == "DequantizeLinear":
            readers.setdefault(weight.name, []).append(layer.name)
    candidates, values = [], {}
    for weight, layers in readers.items():
        constant = splits[layers[0]].constant
        float_name = ctx.unique_name(f"{constant.name}_float")
        values[float_name] = np.asarray(constant_array(constant), dtype=np.float32)
        site = Site(weight, float_name)
        candidates.append(Candidate(layers[0], WEIGHT, (site,), tuple(layers), int(values[float_name].size)))
    return candidates, values


def _dequantized_weight(tensor: gs.Tensor) -> np.ndarray:
    """The values a weight's DequantizeLinear computes (zero point 0)."""
    dequantize = tensor.inputs[0]
    levels, scale = (constant_array(t).astype(np.float32) for t in dequantize.inputs[:2])
    if scale.ndim:
        shape = [1] * levels.ndim
        shape[dequantize.attrs.get("axis", 1)] = scale.size
        scale = scale.reshape(shape)
    return levels * scale


def _activation_sites(graph: gs.Graph, qparams: dict) -> dict[str, Site]:
    """{activation (as the parameters name it): its site}: every DequantizeLinear that reads a
    QuantizeLinear of a tensor (behind the Clip to a k-bit grid, below 8 bits)."""
    sites = {}
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not node.inputs[0].inputs:
            continue
        quantize = node.inputs[0].inputs[0]
        if quantize.op != "QuantizeLinear" or isinstance(quantize.inputs[0], gs.Constant):
            continue
        value = quantize.inputs[0]
        if value.name not in qparams and value.inputs and value.inputs[0].op == "Clip" and len(value.outputs) == 1:
            value = value.inputs[0].inputs[0]  # the grid's Clip
        dequantized = node.outputs[0]
        # a graph output keeps its name on the dequantized tensor (quantize-activations)
        name = dequantized.name if dequantized.name in qparams else value.name
        if name in qparams:
            sites[name] = Site(dequantized.name, value.name)
    return sites


def _activation_candidates(graph: gs.Graph, ctx: CompileContext, sites: dict[str, Site]) -> list[Candidate]:
    """One candidate per group of activations that share parameters (a tensor, the tensors
    behind data movement that take its parameters, the inputs and output of a Concat)."""
    qparams = ctx.facts[ACTIVATION_QPARAMS]
    plan, splits = ctx.facts[ACTIVATION_PLAN], ctx.facts[ACTIVATION_SPLITS]
    sources = activations_to_quantize(plan, splits, ctx.facts[WEIGHT_SPLITS])
    parent = {name: name for name in qparams}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        if a in parent and b in parent:
            parent[root(b)] = root(a)

    for tensor, source in sources.items():
        join(source, tensor)
    replaced = splits.replaced
    for group in plan.shared:
        members = [replaced.get(name, name) for name in group]
        for member in members[1:]:
            join(members[0], member)
    # data movement between two tensors on one grid (a Flatten after a pooling calibrated
    # alike, say): the second quantizes the first's values again to the same levels
    by_dequantized = {site.dequantized: name for name, site in sites.items()}
    tensors = graph.tensors()
    for name, site in sites.items():
        producer = tensors[site.float_value].inputs[0] if tensors[site.float_value].inputs else None
        if producer is None or producer.op not in PASS_THROUGH_OPS or not producer.inputs:
            continue
        before = by_dequantized.get(producer.inputs[0].name)
        if before is not None and _same_grid(qparams[before], qparams[name]):
            join(before, name)
    groups: dict[str, list[str]] = {}
    for name in qparams:  # graph order: deterministic
        if name in sites:
            groups.setdefault(root(name), []).append(name)
    # a group is named by the tensor whose parameters the others share
    return [
        Candidate(root(members[0]), ACTIVATION, tuple(sites[m] for m in members), tuple(members))
        for members in groups.values()
    ]


def _same_grid(a, b) -> bool:
    return np.dtype(a.dtype) == np.dtype(b.dtype) and a.scale == b.scale and a.zero_point == b.zero_point


class _HeldOut:
    """Held-out samples, the float model's values of the measured tensors on them, and the
    output SQNR of any model against them. ``measured`` maps each measured tensor of the
    compiled graph to the float model's."""

    def __init__(self, feeds: list[dict], names: list[str], references: list[dict], unbatched: bool = False):
        self.feeds, self.names = feeds, names
        self.references, self.unbatched = references, unbatched
        self.samples = sum(1 if unbatched or not feed else len(next(iter(feed.values()))) for feed in feeds)
        self.error = OutputError(references)

    @classmethod
    def of(cls, replay: FloatRun, measured: dict[str, str]) -> _HeldOut:
        feeds = [prepare_feed(feed, replay.specs, f"held-out batch {i}") for i, feed in enumerate(replay.held_out())]
        float_model = with_outputs(onnx.ModelProto.FromString(replay.model), measured.values())
        session = new_session(float_model.SerializeToString(), BASIC_OPTIMIZATION, memory_arena=False)
        names, float_names = list(measured), list(measured.values())
        references = [dict(zip(names, session.run(float_names, {**feed, **replay.constants}))) for feed in feeds]
        return cls(feeds, names, references, replay.unbatched)

    def first(self, samples: int) -> _HeldOut:
        """The first ``samples`` of them (whole batches where the model's batch is fixed)."""
        if self.unbatched:
            return _HeldOut(self.feeds[:samples], self.names, self.references[:samples], True)
        feeds, references, count = [], [], 0
        for feed, reference in zip(self.feeds, self.references):
            if count >= samples:
                break
            rows = len(next(iter(feed.values()))) if feed else 1
            take = rows if (not feed or rows <= samples - count) else samples - count
            feeds.append({k: v[:take] for k, v in feed.items()} if take < rows else feed)
            references.append({k: v[:take] for k, v in reference.items()} if take < rows else reference)
            count += take
        return _HeldOut(feeds, self.names, references)

    def session(self, model: onnx.ModelProto, optimization=BASIC_OPTIMIZATION):
        """A session on ``model`` that outputs the measured tensors."""
        return new_session(with_outputs(model, self.names).SerializeToString(), optimization, memory_arena=False)

    def sqnr_db(self, session, extra_feed: dict | None = None) -> float:
        runs = [dict(zip(self.names, session.run(self.names, {**feed, **(extra_feed or {})}))) for feed in self.feeds]
        return self.error.sqnr_db(runs)


def _measured_tensors(graph: gs.Graph, sites: dict[str, Site]) -> dict[str, str]:
    """The float outputs, {compiled graph's tensor: float model's}; a Softmax output is measured
    at its input, the logits: probabilities saturate, so that an error that flips a decision
    and one that changes nothing look alike in them, and errors of several tensors stop adding."""
    float_of = {site.dequantized: site.float_value for site in sites.values()}
    measured = {}
    for output in graph.outputs:
        if output.dtype != np.float32:
            continue
        producer = output.inputs[0] if output.inputs else None
        if producer is not None and producer.op == "Softmax" and not isinstance(producer.inputs[0], gs.Constant):
            logits = producer.inputs[0].name
            measured[logits] = float_of.get(logits, logits)
        else:
            measured[output.name] = output.name
    return measured


def _alone_db(session, held_out: _HeldOut, switches: list[str], kind: str) -> list[float]:
    """The output SQNR with each switch alone on."""
    off = {switch: np.array(0.0, dtype=np.float32) for switch in switches}
    show = progress(f"sensitivity of the {kind}", len(switches))
    alone = []
    for switch in switches:
        alone.append(held_out.sqnr_db(session, {**off, switch: np.array(1.0, dtype=np.float32)}))
        if show is not None:
            show(len(alone))
    return alone


@compiler_pass(
    "analyze-sensitivity",
    requires=(LAYERS, WEIGHT_SPLITS, ACTIVATION_PLAN, ACTIVATION_SPLITS, ACTIVATION_QPARAMS, FLOAT_RUN,
              QUANTIZED_WEIGHTS, QUANTIZED_ACTIVATIONS),  # fmt: skip
    produces=(SENSITIVITY,),
)
def analyze_sensitivity(graph: gs.Graph, ctx: CompileContext) -> None:
    """`--sensitivity`, `--target-sqnr`: the output SQNR of each quantized weight and activation group alone, on
    held-out samples; with a target, the fewest of them, most sensitive first, that must stay float to reach it"""
    config = ctx.config
    if not config.analyzes_sensitivity:
        ctx.facts[SENSITIVITY] = None
        return
    weights, floats = _weight_candidates(ctx)
    sites = _activation_sites(graph, ctx.facts[ACTIVATION_QPARAMS]) if config.abits is not None else {}
    activations = _activation_candidates(graph, ctx, sites) if config.abits is not None else []
    candidates = weights + activations
    measured_tensors = _measured_tensors(graph, sites)
    if not measured_tensors:
        raise UnsupportedModelError("the model has no float outputs: there is no output SQNR to analyze")
    held_out = _HeldOut.of(ctx.facts[FLOAT_RUN], measured_tensors)
    values_per_sample = sum(v.size for feed in held_out.feeds for v in feed.values()) / max(held_out.samples, 1)
    ranking = held_out.first(ranking_samples(held_out.samples, values_per_sample))
    model = graph_to_model(graph)
    alone = []
    if weights:  # activations float
        values = {
            c.sites[0].float_value: (floats[c.sites[0].float_value], _dequantized_weight(graph.tensors()[c.sites[0].dequantized]))
            for c in weights
        }
        switched, switches = layer_switched_model(bypassed_model(model, activations), weights, values)
        alone += _alone_db(ranking.session(switched), ranking, switches, "weights")
    if activations:  # weights float
        switched, switches = switched_model(bypassed_model(model, weights, floats), activations)
        alone += _alone_db(ranking.session(switched), ranking, switches, "activations")
    # most sensitive first; ties (exact tensors) in graph order
    order = sorted(range(len(candidates)), key=lambda i: (alone[i], i))
    with owned.temporary_folder(ctx.scratch) as folder:
        search = _Search(model, [candidates[i] for i in order], floats, held_out, ctx, Path(folder))
        kept: list[int] = []
        if config.seeks_accuracy:
            k = fewest_prefix(search.meets, len(order))
            kept = order[:k] if k is not None else order
            _check_reachable(candidates, kept, k, search)
        final = len(kept)
        metric = None
        if config.metric is not None:
            metric = {"float": search.float_metric(), "as_quantized": search.metric(0), "final": search.metric(final),
                      "max_drop": config.max_drop}  # fmt: skip
    ctx.count(candidates=len(candidates), held_out_samples=held_out.samples, served_models_checked=len(search.sqnr))
    ctx.facts[SENSITIVITY] = Sensitivity(
        held_out.samples,
        tuple(candidates),
        tuple(alone),
        search.sqnr_db(0),
        config.target_sqnr_db,
        tuple(kept),
        search.sqnr_db(final),
        metric,
        ranking.samples,
    )


class _Search:
    """The compiled model with its k most sensitive candidates float, as onnxruntime serves it:
    its output SQNR on the held-out samples and, through the Python API, the user's metric of
    it; each measured once."""

    def __init__(self, model, ranked: list[Candidate], floats: dict, held_out: _HeldOut, ctx: CompileContext, folder: Path):
        self.model, self.ranked, self.floats, self.held_out = model, ranked, floats, held_out
        self.config, self.source, self.folder = ctx.config, ctx.input_model, folder
        self.sqnr: dict[int, float] = {}
        self.metrics: dict[int, float] = {}
        self._float_metric: float | None = None

    def served(self, k: int) -> onnx.ModelProto:
        return bypassed_model(self.model, self.ranked[:k], self.floats)

    def sqnr_db(self, k: int) -> float:
        if k not in self.sqnr:
            self.sqnr[k] = self.held_out.sqnr_db(self.held_out.session(self.served(k), FULL_OPTIMIZATION))
        return self.sqnr[k]

    def _metric_of(self, path: Path) -> float:
        value = self.config.metric(str(path))
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
            raise UsageError(f"metric: returned {value!r} for {path.name}; it must return a finite number")
        return float(value)

    def float_metric(self) -> float:
        if self._float_metric is None:
            path = self.source.path
            if path is None:
                path = self.folder / "float.onnx"
                path.write_bytes(self.source.proto.SerializeToString())
            self._float_metric = self._metric_of(path)
        return self._float_metric

    def metric(self, k: int) -> float:
        if k not in self.metrics:
            path = self.folder / f"candidate-{k}.onnx"
            path.write_bytes(self.served(k).SerializeToString())
            try:
                self.metrics[k] = self._metric_of(path)
            finally:
                path.unlink()
        return self.metrics[k]

    def meets(self, k: int) -> bool:
        """The model with the k most sensitive candidates float meets every target set (the
        output SQNR first: it is the cheaper to measure)."""
        target = self.config.target_sqnr_db
        if target is not None and self.sqnr_db(k) < target:
            return False
        return self.config.metric is None or self.float_metric() - self.metric(k) <= self.config.max_drop

    def describe_target(self) -> str:
        parts = []
        if self.config.target_sqnr_db is not None:
            parts.append(f"output SQNR {self.config.target_sqnr_db:g} dB on {self.held_out.samples} held-out samples")
        if self.config.metric is not None:
            parts.append(f"a metric drop of at most {self.config.max_drop:g} from the float model's {self.float_metric():.4g}")
        return " and ".join(parts)

    def describe(self, k: int) -> str:
        text = _db(self.sqnr_db(k))
        return text + (f", metric {self.metric(k):.4g}" if self.config.metric is not None else "")


def _check_reachable(candidates: list[Candidate], kept: list[int], k: int | None, search: _Search) -> None:
    activations = [i for i, c in enumerate(candidates) if c.kind == ACTIVATION]
    weight_total = sum(c.parameters for c in candidates if c.kind == WEIGHT)
    float_weights = sum(candidates[i].parameters for i in kept if candidates[i].kind == WEIGHT)
    every_activation = bool(activations) and set(activations) <= set(kept)
    half_the_weights = weight_total > 0 and 2 * float_weights > weight_total
    if k is not None and not every_activation and not half_the_weights:
        return
    if k is None:
        reason = f"not even with every quantized tensor float ({search.describe(len(candidates))})"
    elif every_activation:
        reason = "only with every activation float (quantize weights only: --abits none)"
    else:
        reason = f"only with {100 * float_weights / weight_total:.0f} % of the weights float"
    raise AccuracyTargetError(
        f"accuracy target not met: {search.describe_target()} is reached {reason}; the compiled model "
        f"reaches {search.describe(0)}; nothing was written"
    )


def _db(value: float) -> str:
    return "an exact match" if value == math.inf else f"{value:.1f} dB"


@compiler_pass(
    "keep-sensitive-float",
    requires=(SENSITIVITY, LAYERS, WEIGHT_SPLITS),
    effect=GraphEffect.EDITS,
)
def keep_sensitive_float(graph: gs.Graph, ctx: CompileContext) -> None:
    """`--target-sqnr`: the weights and activations analyze-sensitivity chose stay float (their Q/DQ removed)"""
    sensitivity = ctx.facts[SENSITIVITY]
    if sensitivity is None or not sensitivity.kept_float:
        return
    kept = [sensitivity.candidates[i] for i in sensitivity.kept_float]
    tensors = graph.tensors()
    splits = ctx.facts[WEIGHT_SPLITS].layers
    layers = {layer.node.inputs[1].name: [] for layer in ctx.facts[LAYERS]}
    for layer in ctx.facts[LAYERS]:
        layers[layer.node.inputs[1].name].append(layer)
    for candidate in kept:
        for site in candidate.sites:
            if candidate.kind == WEIGHT:
                readers = layers[site.dequantized]
                weight = gs.Constant(site.float_value, constant_array(splits[readers[0].name].constant))
                for layer in readers:
                    layer.node.inputs[1] = weight
                continue
            _bypass(graph, tensors[site.dequantized], tensors[site.float_value])
    # An int32 bias stays as it is (a DequantizeLinear of a constant): the model then is the one
    # the analysis measured, which onnxruntime fuses and rounds as it does the compiled model.
    graph.cleanup(remove_unused_graph_inputs=False)
    ctx.count(
        weights_kept_float=sum(1 for c in kept if c.kind == WEIGHT),
        activations_kept_float=sum(len(c.sites) for c in kept if c.kind == ACTIVATION),
    )


def _bypass(graph: gs.Graph, dequantized: gs.Tensor, value: gs.Tensor) -> None:
    """Every reader of ``dequantized`` reads ``value``; a graph output gets its name back."""
    for consumer in list(dequantized.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is dequantized:
                consumer.inputs[i] = value
    if any(t is dequantized for t in graph.outputs):
        name = dequantized.name
        dequantized.name = f"{name}/quantized"
        value.name = name
        graph.outputs = [value if t is dequantized else t for t in graph.outputs]

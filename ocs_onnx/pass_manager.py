"""Runs an ordered list of named passes over one onnx-graphsurgeon graph.

As in LLVM's new pass manager, each pass does one thing and declares its contract: the facts it
requires and produces (``ocs_onnx.facts``) and what it does to the graph (``GraphEffect``). The
manager refuses, when the pipeline is built, an order in which a pass would read a fact that no
earlier pass produced or that a pass in between invalidated; while it runs, it holds each pass
to its declaration. Everything around a pass (timing, the checker, dumps, stopping early,
handing back memory pages) is an instrumentation callback, so the manager knows nothing about
OCS, quantization or command-line flags.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from .context import CompileContext, log
from .errors import OcsError, first_line
from .facts import Binding, Fact
from .gs_adapter import graph_skeleton


class GraphEffect(enum.Enum):
    """What a pass does to the graph, and so which facts about the graph survive it."""

    # Leaves the graph as it is.
    READS = "reads"
    # Edits the graph where earlier facts say (the OCS and quantization passes): the facts it
    # produces record what it changed, and the earlier facts stay what they were, records of
    # what the earlier passes decided (a layer's node and weight as selected, the planned
    # tensors), which later passes read together with the newer facts.
    EDITS = "edits"
    # Rewrites the graph's structure (folds, fuses, renames, converts; in place or as a new
    # graph): facts about the graph are stale.
    REWRITES = "rewrites"
    # Returns a new graph with the same nodes and tensor names (shape inference): facts holding
    # graph objects are stale, facts naming tensors are not.
    REPLACES = "replaces"

    def invalidates(self, fact: Fact) -> bool:
        if self is GraphEffect.REWRITES:
            return fact.binding is not Binding.NONE
        if self is GraphEffect.REPLACES:
            return fact.binding is Binding.OBJECTS
        return False


@dataclass(frozen=True)
class Pass:
    name: str
    summary: str
    # Edits the graph in place and returns None; a REWRITES or REPLACES pass may return a new graph.
    run: Callable[[gs.Graph, CompileContext], gs.Graph | None]
    requires: tuple[Fact, ...] = ()
    produces: tuple[Fact, ...] = ()
    effect: GraphEffect = GraphEffect.READS


def compiler_pass(
    name: str, requires: Sequence[Fact] = (), produces: Sequence[Fact] = (), effect: GraphEffect = GraphEffect.READS
) -> Callable[[Callable], Pass]:
    """Declares the decorated function ``f(graph, ctx)`` a pass with this contract; the first
    paragraph of its docstring is the pass's summary (``--list-passes``, the README)."""

    def declare(run: Callable) -> Pass:
        summary = " ".join((run.__doc__ or "").strip().split("\n\n")[0].split()).rstrip(".")
        if not summary:
            raise ValueError(f"pass {name!r}: its function needs a docstring (the pass's summary)")
        return Pass(name, summary, run, tuple(requires), tuple(produces), effect)

    return declare


class PipelineOrderError(ValueError):
    """A pipeline whose order breaks a pass's contract (a bug in whoever built it)."""


class InvalidGraphError(OcsError):
    """A pass left a graph that onnx.checker rejects: a bug in that pass."""


class PassFailure(Exception):
    """A pass raised something that is not a user-facing error: a bug, located."""

    def __init__(self, pass_name: str, passes_before: list[str], cause: BaseException):
        before = f" (after {', '.join(passes_before)})" if passes_before else " (the first pass)"
        super().__init__(f"in pass {pass_name!r}{before}: {type(cause).__name__}: {first_line(cause)}")
        self.pass_name = pass_name
        self.cause = cause


def check_order(passes: Sequence[Pass]) -> None:
    """Raises PipelineOrderError, naming both passes, where a pass requires a fact that is not
    available at its place in the pipeline; also where two passes write the same fact."""
    effects = {p.name: p.effect for p in passes}
    producer: dict[Fact, str] = {}
    available: dict[Fact, str] = {}  # fact -> the pass that produced it
    invalidated: dict[Fact, tuple[str, str]] = {}  # fact -> (its producer, the pass that invalidated it)
    for p in passes:
        for fact in p.requires:
            if fact in available:
                continue
            if fact in invalidated:
                made_by, broken_by = invalidated[fact]
                raise PipelineOrderError(
                    f"pass {p.name!r} requires {fact.name!r} from {made_by!r}, but {broken_by!r} runs in between "
                    f"and {_EFFECT_TEXT[effects[broken_by]]}, which invalidates it; run {broken_by!r} before {made_by!r}"
                )
            later = next((q.name for q in passes if fact in q.produces), None)
            if later is not None:
                raise PipelineOrderError(f"pass {p.name!r} requires {fact.name!r}, which {later!r} produces after it")
            raise PipelineOrderError(f"pass {p.name!r} requires {fact.name!r}, which no pass produces")
        for fact in list(available):
            if p.effect.invalidates(fact) and fact not in p.produces:
                invalidated[fact] = (available.pop(fact), p.name)
        for fact in p.produces:
            if fact in producer:
                raise PipelineOrderError(f"passes {producer[fact]!r} and {p.name!r} both produce {fact.name!r}")
            producer[fact] = p.name
            available[fact] = p.name
            invalidated.pop(fact, None)


_EFFECT_TEXT = {
    GraphEffect.REWRITES: "rewrites the graph's structure",
    GraphEffect.REPLACES: "replaces the graph",
}


class PassInstrumentation:
    """Callbacks around every pass (LLVM's PassInstrumentation). The defaults do nothing."""

    def should_run(self, p: Pass) -> bool:
        return True

    def before_pass(self, p: Pass, graph: gs.Graph, ctx: CompileContext) -> None:
        pass

    def after_pass(self, p: Pass, graph: gs.Graph, ctx: CompileContext) -> None:
        pass


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise PipelineOrderError(f"pass names must be unique: {names}")
        check_order(passes)
        self.passes = list(passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, graph: gs.Graph, ctx: CompileContext, instruments: Iterable[PassInstrumentation] = ()) -> gs.Graph:
        instruments = list(instruments)
        done: list[str] = []
        for p in self.passes:
            if not all(i.should_run(p) for i in instruments):
                continue
            for i in instruments:
                i.before_pass(p, graph, ctx)
            with ctx.facts.opened_for(p.name, p.requires, p.produces):
                try:
                    new_graph = p.run(graph, ctx)
                except OcsError:
                    raise
                except Exception as exc:
                    raise PassFailure(p.name, done, exc) from exc
            if new_graph is not None:
                if p.effect not in (GraphEffect.REWRITES, GraphEffect.REPLACES):
                    raise PassFailure(p.name, done, TypeError("returned a new graph but declares it does not"))
                graph = new_graph
            ctx.facts.invalidate(lambda fact, p=p: p.effect.invalidates(fact) and fact not in p.produces)
            missing = [f.name for f in p.produces if not ctx.facts.has(f)]
            if missing:
                raise PassFailure(p.name, done, RuntimeError(f"did not produce {', '.join(missing)}"))
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            for i in instruments:
                i.after_pass(p, graph, ctx)
            done.append(p.name)
        return graph


# --------------------------------------------------------------------------------------------
# Instrumentation
# --------------------------------------------------------------------------------------------


class Timing(PassInstrumentation):
    """Seconds per pass, into ``ctx.pass_seconds`` and the debug log (``-v``); put it first, so
    that the other callbacks' work is not counted."""

    def __init__(self):
        self._start = 0.0

    def before_pass(self, p, graph, ctx):
        log.debug("pass %s: start", p.name)
        self._start = time.perf_counter()

    def after_pass(self, p, graph, ctx):
        ctx.pass_seconds[p.name] = time.perf_counter() - self._start
        log.debug("pass %s: %.3f s", p.name, ctx.pass_seconds[p.name])


def check_graph(graph: gs.Graph) -> None:
    model, _ = graph_skeleton(graph)  # the structure; large weights as typed inputs
    onnx.checker.check_model(model)


class VerifyEach(PassInstrumentation):
    """onnx.checker after every pass: a pass that leaves an invalid graph is named."""

    def after_pass(self, p, graph, ctx):
        try:
            check_graph(graph)
        except onnx.checker.ValidationError as exc:
            raise InvalidGraphError(f"internal error: pass {p.name!r} produced an invalid graph: {first_line(exc)}")


class DumpAfter(PassInstrumentation):
    """Hands the graph after each of the named passes to ``dump(pass name, graph)``."""

    def __init__(self, names: Iterable[str], dump: Callable[[str, gs.Graph], None]):
        self.names, self.dump = set(names), dump

    def after_pass(self, p, graph, ctx):
        if p.name in self.names:
            self.dump(p.name, graph)


class StopAfter(PassInstrumentation):
    """Runs no pass after the named one."""

    def __init__(self, name: str):
        self.name, self.reached = name, False

    def should_run(self, p):
        return not self.reached

    def after_pass(self, p, graph, ctx):
        self.reached = self.reached or p.name == self.name


class AfterEach(PassInstrumentation):
    """Calls ``action()`` after every pass (e.g. handing mapped weight pages back)."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def after_pass(self, p, graph, ctx):
        self.action()


# --------------------------------------------------------------------------------------------
# Descriptions (--list-passes, the README's pipeline table)
# --------------------------------------------------------------------------------------------

_EFFECT_WORDS = {
    GraphEffect.READS: "reads the graph",
    GraphEffect.EDITS: "edits the graph",
    GraphEffect.REWRITES: "rewrites the graph",
    GraphEffect.REPLACES: "replaces the graph",
}


def _names(facts: Sequence[Fact]) -> str:
    return ", ".join(f.name for f in facts) or "-"


def describe_passes(passes: Sequence[Pass]) -> str:
    """The pipeline as text: each pass, what it does, its effect on the graph and its facts."""
    lines = []
    for index, p in enumerate(passes, start=1):
        lines.append(f"{index:2d}. {p.name:26s} {p.summary}")
        lines.append(f"{'':30s}{_EFFECT_WORDS[p.effect]}; requires {_names(p.requires)}; produces {_names(p.produces)}")
    return "\n".join(lines)


def passes_markdown(passes: Sequence[Pass]) -> str:
    """The pipeline as a Markdown table (the README's, which a test keeps equal to this)."""
    rows = ["| pass | what it does | graph | requires | produces |", "|---|---|---|---|---|"]
    for p in passes:
        source = "passes/" + p.run.__module__.rsplit(".", 1)[-1] + ".py"
        rows.append(
            f"| [`{p.name}`]({source}) | {p.summary} | {p.effect.value} | {_names(p.requires)} | {_names(p.produces)} |"
        )
    return "\n".join(rows)

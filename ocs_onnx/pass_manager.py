"""Runs an ordered list of named passes over one onnx-graphsurgeon graph.

Like LLVM's pass manager: each pass does one thing, the list is visible (``--list-passes``),
the graph is verified after every pass, each pass is timed, and the graph can be written out
after any pass (``--dump-after NAME``). It knows nothing about OCS or quantization.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from .context import CompileContext, log
from .errors import OcsError, UsageError, first_line
from .model_io import graph_skeleton


@dataclass(frozen=True)
class Pass:
    name: str
    summary: str
    # Rewrites the graph in place and returns None, or returns a new graph.
    run: Callable[[gs.Graph, CompileContext], gs.Graph | None]


class InvalidGraphError(OcsError):
    """A pass left a graph that onnx.checker rejects: a bug in that pass."""


def check_graph(graph: gs.Graph) -> None:
    model, _ = graph_skeleton(graph)  # the structure; large weights as typed inputs
    onnx.checker.check_model(model)


class PassManager:
    def __init__(self, passes: Sequence[Pass], verify_each: bool = True):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique: {names}")
        self.passes = list(passes)
        self.verify_each = verify_each

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def check_pass_name(self, name: str, flag: str) -> None:
        if name not in self.names:
            raise UsageError(f"{flag}: no pass named {name!r}; the passes are: {', '.join(self.names)}")

    def run(
        self,
        graph: gs.Graph,
        ctx: CompileContext,
        stop_after: str | None = None,
        dump_after: Sequence[str] = (),
        dump: Callable[[str, gs.Graph], None] | None = None,
        after_each: Callable[[], None] | None = None,
    ) -> gs.Graph:
        if stop_after is not None:
            self.check_pass_name(stop_after, "--stop-after")
        for name in dump_after:
            self.check_pass_name(name, "--dump-after")
        for p in self.passes:
            start = time.perf_counter()
            log.debug("pass %s: start", p.name)
            graph = p.run(graph, ctx) or graph
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            ctx.pass_seconds[p.name] = time.perf_counter() - start
            log.debug("pass %s: %.3f s", p.name, ctx.pass_seconds[p.name])
            if self.verify_each:
                try:
                    check_graph(graph)
                except onnx.checker.ValidationError as exc:
                    raise InvalidGraphError(
                        f"internal error: pass {p.name!r} produced an invalid graph: {first_line(exc)}"
                    )
            if dump is not None and p.name in dump_after:
                dump(p.name, graph)
            if after_each is not None:
                after_each()
            if p.name == stop_after:
                break
        return graph

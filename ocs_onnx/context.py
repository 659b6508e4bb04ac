"""The compile context: the facts passes hand to each other, and the services every pass may
use (configuration, unique names, warnings, per-pass statistics, memory-page release)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .config import CompileConfig
from .facts import Fact

log = logging.getLogger("ocs_onnx")


class FactError(RuntimeError):
    """A pass read or wrote a fact outside its declared contract: a bug in that pass."""


class Facts:
    """The facts produced so far. While a pass runs (``opened_for``) it may read only the facts
    it requires and write only those it produces, each once; outside a pass (the report) facts
    are read with ``get``."""

    def __init__(self):
        self._values: dict[Fact, Any] = {}
        self._pass: str | None = None
        self._readable: frozenset[Fact] = frozenset()
        self._writable: frozenset[Fact] = frozenset()

    @contextlib.contextmanager
    def opened_for(self, pass_name: str, requires, produces) -> Iterator[None]:
        self._pass, self._readable, self._writable = pass_name, frozenset(requires), frozenset(produces)
        try:
            yield
        finally:
            self._pass, self._readable, self._writable = None, frozenset(), frozenset()

    def __getitem__(self, fact: Fact):
        if self._pass is not None and fact not in self._readable and fact not in self._writable:
            raise FactError(f"pass {self._pass!r} reads {fact.name!r} without declaring that it requires it")
        if fact not in self._values:
            raise FactError(f"{fact.name!r} is not available (not produced yet, or invalidated)")
        return self._values[fact]

    def __setitem__(self, fact: Fact, value) -> None:
        if self._pass is None or fact not in self._writable:
            raise FactError(f"pass {self._pass!r} writes {fact.name!r} without declaring that it produces it")
        if fact in self._values:
            raise FactError(f"pass {self._pass!r} writes {fact.name!r} twice")
        self._values[fact] = value

    @property
    def current_pass(self) -> str | None:
        return self._pass

    def has(self, fact: Fact) -> bool:
        return fact in self._values

    def get(self, fact: Fact, default=None):
        """A fact if it was produced, else ``default`` (for readers outside the pipeline)."""
        return self._values.get(fact, default)

    def invalidate(self, stale: Callable[[Fact], bool]) -> None:
        for fact in [f for f in self._values if stale(f)]:
            del self._values[fact]


class UniqueNames:
    """Tensor and node names not used anywhere in the graph yet (deterministic)."""

    def __init__(self, graph: gs.Graph | None = None):
        self._used: set[str] = set()
        if graph is not None:
            self._used = {t for t in graph.tensors()} | {n.name for n in graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self._used:
            name = f"{base}_{k}"
            k += 1
        self._used.add(name)
        return name


@dataclass
class CompileContext:
    config: CompileConfig
    # Where the model came from, for messages and the report.
    source: str = "<model>"
    # The model as loaded (a ModelSource), to tell a model that cannot run from a compiled
    # model that cannot.
    input_model: Any = None
    # A folder for temporary files (a large model's copy for onnxruntime); None: the system's.
    scratch: Path | None = None
    # Hands the memory pages of a weight read from a mapped data file back to the kernel (see
    # MappedData.release); passes that read every weight call ``done_with`` after each layer.
    release: Callable[[np.ndarray | None], None] | None = None
    facts: Facts = field(default_factory=Facts)
    unique_name: UniqueNames = field(default_factory=UniqueNames)
    # What each pass counted, {pass name: {statistic: value}} (the report's normalization).
    statistics: dict[str, dict] = field(default_factory=dict)
    # Seconds per pass (the Timing instrumentation writes them).
    pass_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def done_with(self, array) -> None:
        """The pass has read ``array`` (a weight) for now."""
        if self.release is not None:
            self.release(array)

    def warn(self, message: str) -> None:
        """A warning for the user: logged now and listed in the report."""
        self.warnings.append(message)
        log.warning(message)

    def count(self, **values) -> None:
        """Statistics of the running pass (how many nodes it folded, ...), for the report."""
        self.statistics.setdefault(self.facts.current_pass, {}).update(values)

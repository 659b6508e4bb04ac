"""``compare``: how far one model's outputs are from another's on the same inputs (a compiled
model against its float model, say): per output, the SQNR of the candidate against the
reference, the largest absolute difference, the cosine similarity and, for outputs with a class
axis (the last), how often their argmax agree."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .calibration import (
    integer_input_limits,
    model_input_specs,
    open_calibration_data,
    prepare_feed,
    synthetic_batches,
)
from .errors import InvalidModelError, UsageError
from .loading import load_model
from .sessions import new_session, onnxruntime_message


class _OutputStatistics:
    """Running sums for one output: signal and noise energy, products, largest difference, and
    argmax agreements over the rows (where the output has a class axis)."""

    def __init__(self):
        self.signal = self.noise = self.dot = self.candidate_energy = 0.0
        self.max_abs = 0.0
        self.rows = self.agreeing = 0
        self.shape: list[int] | None = None

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        r = np.asarray(reference, dtype=np.float64)
        c = np.asarray(candidate, dtype=np.float64)
        if r.shape != c.shape:
            raise UsageError(f"output shapes differ: {list(r.shape)} in the reference, {list(c.shape)} in the candidate")
        if self.shape is None or not r.ndim:
            self.shape = list(r.shape)
        else:  # batches stack along the first axis
            self.shape = [self.shape[0] + r.shape[0], *r.shape[1:]]
        difference = r - c
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(difference * difference))
        self.dot += float(np.sum(r * c))
        self.candidate_energy += float(np.sum(c * c))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(difference), initial=0.0)))
        if r.ndim >= 2 and r.shape[-1] > 1:
            self.rows += int(np.prod(r.shape[:-1]))
            self.agreeing += int(np.sum(r.argmax(-1) == c.argmax(-1)))

    def as_dict(self) -> dict:
        def finite(value: float) -> float | None:  # JSON has no infinity; null = exact match
            return round(value, 4) if math.isfinite(value) else None

        sqnr = math.inf if self.noise == 0 else (-math.inf if self.signal == 0 else 10 * math.log10(self.signal / self.noise))
        norms = math.sqrt(self.signal * self.candidate_energy)
        return {
            "shape": self.shape,
            "sqnr_db": finite(sqnr),
            "max_abs_error": self.max_abs if math.isfinite(self.max_abs) else None,
            "cosine": (self.dot / norms if norms > 0 else None),
            "argmax_agreement": (self.agreeing / self.rows if self.rows else None),
        }


def compare_models(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    data: str | os.PathLike | None = None,
    samples: int = 64,
    batch: int = 16,
    seed: int = 0,
) -> dict:
    """Runs both models on ``data`` (calibration-data format: an .npz or a folder; seeded
    synthetic inputs without it), ``samples`` at most, and returns per-output statistics of the
    candidate against the reference. The models must have the same inputs and outputs."""
    for name, value in (("--samples", samples), ("--batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    sources = [load_model(reference), load_model(candidate)]  # checked, with clear errors
    sessions = []
    for path, source in zip((reference, candidate), sources):
        try:  # as onnxruntime serves it: every optimization, integer kernels and all
            sessions.append(new_session(str(path)))
        except Exception as exc:
            raise InvalidModelError(f"{source.where}: onnxruntime cannot load it: {onnxruntime_message(exc)}")
    specs = []
    for session, source in zip(sessions, sources):
        names = {i.name for i in session.get_inputs()}
        specs.append([s for s in model_input_specs(source.proto) if s.name in names])
    outputs = [[o.name for o in session.get_outputs()] for session in sessions]
    if [s.name for s in specs[0]] != [s.name for s in specs[1]]:
        raise UsageError(f"the models have different inputs: {[s.name for s in specs[0]]} and {[s.name for s in specs[1]]}")
    if sorted(outputs[0]) != sorted(outputs[1]):
        raise UsageError(f"the models have different outputs: {outputs[0]} and {outputs[1]}")
    inputs = specs[0]
    fixed = next((s.batch_dim for s in inputs if s.batch_dim is not None), None)
    batch = fixed or batch
    if data is not None:
        batches = open_calibration_data(Path(data), inputs).batches(samples, batch)
        source = str(data)
    else:
        limits = integer_input_limits(sources[0].graph())
        batches = synthetic_batches(inputs, samples, batch, seed, limits)
        source = "synthetic"
    statistics = {name: _OutputStatistics() for name in outputs[0]}
    count = 0
    for index, feed in enumerate(batches):
        feed = prepare_feed(feed, inputs, f"batch {index}")
        if fixed is not None and feed and len(next(iter(feed.values()))) != fixed:
            continue
        results = []
        for session, names in zip(sessions, outputs):
            try:
                results.append(dict(zip(names, session.run(names, feed))))
            except Exception as exc:
                raise InvalidModelError(f"onnxruntime cannot run a model on batch {index}: {onnxruntime_message(exc)}")
        for name, stats in statistics.items():
            if np.asarray(results[0][name]).dtype.kind == "f":
                stats.update(results[0][name], results[1][name])
        count += len(next(iter(feed.values()))) if feed else 1
    if count == 0:
        raise UsageError("no samples to compare on")
    return {
        "reference": str(reference),
        "candidate": str(candidate),
        "inputs": source,
        "samples": count,
        "outputs": {name: stats.as_dict() for name, stats in statistics.items() if stats.shape is not None},
    }


def comparison_text(result: dict) -> str:
    """The comparison as a table for people."""
    rows = [("output", "shape", "SQNR", "max |diff|", "cosine", "argmax agree")]
    for name, o in result["outputs"].items():
        rows.append(
            (
                name,
                "x".join(map(str, o["shape"])),
                "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:.2f} dB",
                f"{o['max_abs_error']:.4g}" if o["max_abs_error"] is not None else "inf",
                f"{o['cosine']:.6f}" if o["cosine"] is not None else "-",
                f"{100 * o['argmax_agreement']:.1f} %" if o["argmax_agreement"] is not None else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"{result['candidate']} against {result['reference']} on {result['samples']} samples ({result['inputs']})")
    return "\n".join(lines)

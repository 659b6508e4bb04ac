"""calibrate: runs the float model in onnxruntime on calibration inputs and records
the range of every activation that gets quantized. Without ``--calib-data`` it calibrates on
seeded synthetic inputs and says so; with ``--abits none`` there is nothing to calibrate."""

from __future__ import annotations

import sys

import onnx_graphsurgeon as gs

from ocs_onnx.calibration import (
    InputSpec,
    model_input_specs,
    observe_ranges,
    open_calibration_data,
    synthetic_batches,
)
from ocs_onnx.context import CompileContext, log
from ocs_onnx.errors import CalibrationDataError
from ocs_onnx.model_io import constant_array, graph_skeleton
from ocs_onnx.pass_manager import Pass


def integer_input_limits(graph: gs.Graph) -> dict[str, int]:
    """For integer inputs used as Gather indices into a constant table (token ids), the table
    size along the gathered axis: synthetic ids must stay below it."""
    limits = {}
    for tensor in graph.inputs:
        for consumer in tensor.outputs:
            if consumer.op == "Gather" and consumer.inputs[1] is tensor and isinstance(consumer.inputs[0], gs.Constant):
                axis, shape = consumer.attrs.get("axis", 0), consumer.inputs[0].shape
                if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
                    continue  # a malformed axis: running the model reports it
                size = shape[axis]
                limits[tensor.name] = min(limits.get(tensor.name, size), size)
    return limits


def _batch_size(specs: list[InputSpec], requested: int) -> int:
    static = {s.batch_dim for s in specs if s.batch_dim is not None}
    if len(static) > 1:
        raise CalibrationDataError(f"model inputs have different fixed batch sizes {sorted(static)}")
    return static.pop() if static else requested


def _progress(total: int):
    if not sys.stderr.isatty() or not log.isEnabledFor(20):
        return None

    def show(done: int) -> None:
        sys.stderr.write(f"\rcalibrating: {done}/{total} samples")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    config = ctx.config
    if config.abits is None:
        ctx.calibration = {"source": "none (weight-only quantization)", "samples": 0}
        return
    # The model without its large weights: onnxruntime reads them from the arrays the graph
    # holds (mapped from the input's data file, say) instead of from a copy.
    model, left_out = graph_skeleton(graph)
    constants = {name: constant_array(c) for name, c in left_out.items()}
    specs = [s for s in model_input_specs(model) if s.name not in constants]
    batch = _batch_size(specs, config.calib_batch)
    limits = integer_input_limits(graph)
    synthetic_feed = None
    if config.calib_data is not None:
        data = open_calibration_data(config.calib_data, specs)
        total = min(config.calib_samples, data.samples)
        batches = data.batches(total, batch)
        source = str(config.calib_data)

        def synthetic_feed(rows: int) -> dict:
            return next(synthetic_batches(specs, rows, rows, config.seed, limits))

    else:
        total = config.calib_samples
        batches = synthetic_batches(specs, total, batch, config.seed, limits)
        source = "synthetic"
        ctx.warn(
            "no --calib-data: activation ranges come from synthetic random inputs and may not match real data; "
            "pass --calib-data for accuracy, or --abits none for weight-only quantization"
        )
    fixed_batch = any(s.batch_dim is not None for s in specs)
    if fixed_batch:
        batches = (feed for feed in batches if next(iter(feed.values())).shape[0] == batch)
    names = sorted(set(ctx.activations.values()))
    result = observe_ranges(
        model,
        names,
        batches,
        specs,
        on_batch=_progress(total),
        channel_layouts=ctx.activation_split_candidates,
        synthetic_feed=synthetic_feed,
        constants=constants,
    )
    if result.samples == 0:
        raise CalibrationDataError(f"no calibration samples could be used (the model needs batches of exactly {batch})")
    ctx.activation_ranges = result.ranges
    ctx.activation_histograms = result.histograms
    ctx.activation_channel_histograms = result.channel_histograms
    ctx.reference_batch = result.reference
    ctx.calibration = {"source": source, "samples": result.samples, "batch": batch, "observed_tensors": len(names)}


PASS = Pass("calibrate", "run the float model in onnxruntime on calibration inputs; record activation ranges", run)

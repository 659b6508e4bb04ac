"""calibrate: runs the float model in onnxruntime on calibration inputs and records
the range of every activation that gets quantized. Without ``--calib-data`` it calibrates on
seeded synthetic inputs and says so; with ``--abits none`` there is nothing to calibrate."""

from __future__ import annotations


import onnx_graphsurgeon as gs

from ocs_onnx.calibration import (
    SYNTHETIC_BATCH_MAX_BYTES,
    InputSpec,
    integer_input_limits,
    model_input_specs,
    observe_ranges,
    open_calibration_data,
    synthetic_batches,
    synthetic_sample_bytes,
)
from ocs_onnx.context import CompileContext
from ocs_onnx.errors import CalibrationDataError
from ocs_onnx.facts import (
    ACTIVATION_PLAN,
    ACTIVATION_STATISTICS,
    CALIBRATION,
    FLOAT_RUN,
    LAYER_INPUTS,
    ActivationStatistics,
    Calibration,
    FloatRun,
)
from ocs_onnx.gs_adapter import constant_array, graph_skeleton
from ocs_onnx.hessian import InputGram
from ocs_onnx.pass_manager import compiler_pass
from ocs_onnx.progress import progress


# Random inputs beyond this many add time, not information.
SYNTHETIC_SAMPLES_MAX = 1024


def _batch_size(specs: list[InputSpec], requested: int) -> int:
    static = {s.batch_dim for s in specs if s.batch_dim is not None}
    if len(static) > 1:
        raise CalibrationDataError(f"model inputs have different fixed batch sizes {sorted(static)}")
    return static.pop() if static else requested


def _held_out_samples(available: int, multiple: int, config) -> int:
    """How many of the last samples calibration leaves to the sensitivity analysis: the
    configured number, at most half of them, a multiple of a fixed batch size."""
    if not config.analyzes_sensitivity:
        return 0
    held = min(config.holdout_samples, available // 2) // multiple * multiple
    if held < 1:
        flag = "--target-sqnr" if config.target_sqnr_db is not None else "--sensitivity"
        raise CalibrationDataError(
            f"{flag} holds out the last samples of --calib-data for its measurements and needs at least "
            f"{2 * multiple} (half of them held out{f', in batches of {multiple}' if multiple > 1 else ''}); "
            f"{config.calib_data} has {available}"
        )
    return held


@compiler_pass(
    "calibrate", requires=(ACTIVATION_PLAN,), produces=(ACTIVATION_STATISTICS, CALIBRATION, LAYER_INPUTS, FLOAT_RUN)
)
def calibrate(graph: gs.Graph, ctx: CompileContext) -> None:
    """The float model runs in onnxruntime on the calibration data: running min/max and a
    streaming histogram per tensor (per channel for activation OCS candidates; with `--rounding
    hessian` or `--bias-correction`, each layer's input Gram matrix and mean)."""
    config = ctx.config
    plan = ctx.facts[ACTIVATION_PLAN]
    grams = {layer: InputGram(layout, config.seed) for layer, layout in plan.input_layouts.items()}
    ctx.facts[LAYER_INPUTS] = grams
    if config.abits is None and not grams and not config.analyzes_sensitivity:
        ctx.facts[CALIBRATION] = Calibration({"source": "none (weight-only quantization)", "samples": 0}, None)
        ctx.facts[ACTIVATION_STATISTICS] = ActivationStatistics({}, {}, {})
        ctx.facts[FLOAT_RUN] = None
        return
    # The model without its large weights: onnxruntime reads them from the arrays the graph
    # holds (mapped from the input's data file, say) instead of from a copy.
    model, left_out = graph_skeleton(graph)
    constants = {name: constant_array(c) for name, c in left_out.items()}
    specs = [s for s in model_input_specs(model) if s.name not in constants]
    data = open_calibration_data(config.calib_data, specs) if specs and config.calib_data is not None else None
    # data stacking whole feeds is fed one feed at a time, whatever the model's first axis is
    unbatched = data is not None and data.unbatched
    batch = 1 if unbatched else _batch_size(specs, config.calib_batch)
    limits = integer_input_limits(graph)
    synthetic_feed = None
    held, held_out = 0, None
    if not specs:
        # A model without inputs computes one thing: one run observes all of it.
        if config.calib_data is not None:
            ctx.warn(f"the model has no inputs; --calib-data {config.calib_data} is not used")
        total, source = 1, "none needed (the model has no inputs)"

        def make_batches():
            return iter([{}])

        if config.analyzes_sensitivity:
            held, held_out = 1, make_batches

    elif data is not None:
        fixed = not unbatched and any(s.batch_dim is not None for s in specs)
        held = _held_out_samples(data.samples, batch if fixed else 1, config)
        total = min(config.calib_samples, data.samples - held)
        source = str(config.calib_data)

        def make_batches():
            return data.batches(total, batch)

        if held:

            def held_out():
                return data.batches(held, batch, skip=data.samples - held)

        def synthetic_feed(rows: int) -> dict:
            return next(synthetic_batches(specs, rows, rows, config.seed, limits))

    else:
        total = min(config.calib_samples, SYNTHETIC_SAMPLES_MAX)
        if not any(s.batch_dim is not None for s in specs):
            batch = max(1, min(batch, SYNTHETIC_BATCH_MAX_BYTES // max(synthetic_sample_bytes(specs), 1)))
        if total < config.calib_samples:
            ctx.warn(
                f"--calib-samples {config.calib_samples:,}: synthetic calibration uses at most {SYNTHETIC_SAMPLES_MAX:,} "
                "samples (more random inputs do not make the ranges any truer)"
            )
        source = "synthetic"

        def make_batches():
            return synthetic_batches(specs, total, batch, config.seed, limits)

        ctx.warn(
            "no --calib-data: activation ranges come from synthetic random inputs and may not match real data; "
            "pass --calib-data for accuracy, or --abits none for weight-only quantization"
        )
    fixed_batch = unbatched or any(s.batch_dim is not None for s in specs)

    def sized_batches():
        batches = make_batches()
        if unbatched or not fixed_batch:
            return batches
        return (feed for feed in batches if next(iter(feed.values())).shape[0] == batch)

    # a later pass compares the layers' float inputs with the quantized model's on the same data
    replay = (
        None
        if not (config.refines_rounding and grams) and not config.analyzes_sensitivity
        else FloatRun(model.SerializeToString(), constants, specs, sized_batches, fixed_batch, held_out, unbatched)
    )
    ctx.facts[FLOAT_RUN] = replay
    if config.abits is None and not grams:  # only the held-out samples were wanted
        ctx.facts[ACTIVATION_STATISTICS] = ActivationStatistics({}, {}, {})
        summary = {"source": source, "samples": 0, "held_out_samples": held}
        ctx.facts[CALIBRATION] = Calibration(summary, None)
        return
    batches = sized_batches()
    peak_axes = dict(plan.channel_peak_inputs.values())
    names = sorted(set(plan.tensors.values()) | set(peak_axes) | {gram.layout.tensor for gram in grams.values()})
    result = observe_ranges(
        model,
        names,
        batches,
        specs,
        on_batch=progress("calibrating", total, " samples"),
        channel_layouts=plan.split_candidates,
        synthetic_feed=synthetic_feed,
        constants=constants,
        peak_axes=peak_axes,
        grams=list(grams.values()),
        unbatched=unbatched,
    )
    if result.samples == 0:
        raise CalibrationDataError(f"no calibration samples could be used (the model needs batches of exactly {batch})")
    if config.abits is None:  # only the layers' inputs were wanted
        ctx.facts[ACTIVATION_STATISTICS] = ActivationStatistics({}, {}, {})
    else:
        ctx.facts[ACTIVATION_STATISTICS] = ActivationStatistics(
            result.ranges, result.histograms, result.channel_histograms, result.channel_peaks
        )
    summary = {"source": source, "samples": result.samples, "batch": batch, "observed_tensors": len(names)}
    if config.analyzes_sensitivity:
        summary["held_out_samples"] = held
    ctx.facts[CALIBRATION] = Calibration(summary, result.reference)

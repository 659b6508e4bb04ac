"""The ``ocs-onnx`` command: a thin layer over ``ocs_onnx.compile_file``.

Every failure ends in one line on stderr and a documented exit code (see ``errors.py`` and the
README); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from . import __version__, bus_error, owned, progress
from .clip import CLIP_METHODS
from .config import ACTIVATION_TYPES, GRANULARITIES, ROUNDING_INPUTS, ROUNDINGS, SPLIT_MODES, CompileConfig
from .errors import INTERNAL, USAGE, OcsError, UsageError, first_line, one_line
from .pass_manager import PassFailure
from .writing import Publication, default_output_path

log = logging.getLogger("ocs_onnx")


class BitsOrNone(click.ParamType):
    name = "BITS|none"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a bit width or 'none'", param, ctx)


class NumberOrNone(click.ParamType):
    name = "DB|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if isinstance(value, str) and value.lower() == "none":
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number or 'none'", param, ctx)


class NumberOrAuto(click.ParamType):
    name = "DB|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if isinstance(value, str) and value.lower() == "auto":
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number or 'auto'", param, ctx)


class _MessageFormatter(logging.Formatter):
    """Plain text for information; 'ocs-onnx: warning: ...' for anything that needs attention."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()  # tables and summaries, several lines by design
        return f"ocs-onnx: {record.levelname.lower()}: {one_line(record.getMessage())}"


class _JsonFormatter(logging.Formatter):
    """One JSON object per record, for CI systems that parse their logs."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower(), "message": record.getMessage()})


def _configure_logging(quiet: bool, verbose: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _MessageFormatter())
    progress.enabled = log_format != "json"
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ocs-onnx")
def cli():
    """Post-training quantization of ONNX models with Outlier Channel Splitting.

    Run 'ocs-onnx compile --help' for the compiler's options.
    """


def _list_passes() -> None:
    from .compiler import build_pass_manager
    from .pass_manager import describe_passes

    click.echo(describe_passes(build_pass_manager().passes))


# Every option's default is CompileConfig's: the CLI and the Python API cannot drift apart.
DEFAULTS = CompileConfig()


def _option(*flags: str, field: str, **kwargs):
    """A click option whose default is the CompileConfig field's (shown in --help)."""
    return click.option(*flags, default=getattr(DEFAULTS, field), show_default=True, **kwargs)


# CompileConfig fields whose flag's parameter has another name
_FLAG_PARAMETERS = {
    "fold_ocs_copies": "fold_copies",
    "min_split_gain_db": "min_split_gain",
    "int8_error_margin_db": "int8_error_margin",
    "target_sqnr_db": "target_sqnr",
    "verify": "no_verify",
    "min_kernel_agreement_db": "min_kernel_agreement",
}


def _effective_config(flags: dict, config_path: Path | None) -> CompileConfig:
    """The flags' configuration, over the --config file's where a flag was not given."""
    if config_path is None:
        return CompileConfig(**flags)
    from .config_file import read_config_file

    options = read_config_file(config_path)
    context = click.get_current_context()
    for key, value in flags.items():
        source = context.get_parameter_source(_FLAG_PARAMETERS.get(key, key))
        if key not in options or source not in (click.core.ParameterSource.DEFAULT, None):
            options[key] = value
    try:
        return CompileConfig(**options)
    except UsageError as exc:
        raise UsageError(f"{exc.message} (from --config {config_path} or a flag)")


@cli.command("compile")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Output model [default: MODEL with suffix .q.onnx]."
)
@_option("--wbits", field="wbits", type=int, help="Weight bits (2-8).")
@click.option(
    "--abits",
    type=BitsOrNone(),
    default=str(DEFAULTS.abits),
    show_default=True,
    help="Activation bits (2-8), or 'none' for weight-only quantization without calibration.",
)
@_option(
    "--ratio",
    field="ratio",
    type=float,
    help="OCS expansion ratio r: ceil(r * C_in) channel splits per layer (0 disables OCS).",
)
@_option(
    "--act-ratio",
    field="act_ratio",
    type=float,
    help="Activation OCS ratio: split ceil(r * C) channels of each layer input, those with the most "
    "calibration values beyond the tensor's 99th percentile (0 disables).",
)
@_option(
    "--split", field="split", type=click.Choice(SPLIT_MODES), help="Quantization-aware split (paper eq. 6) or naive halving."
)
@_option(
    "--fold-copies/--no-fold-copies",
    field="fold_ocs_copies",
    help="Compute the copies of split channels in the layer producing them (duplicated output rows) where it can, "
    "instead of copying them at run time.",
)
@click.option(
    "--min-split-gain",
    type=NumberOrAuto(),
    default="auto",
    show_default=True,
    help="Keep a layer's OCS splits only when they raise its estimated output SQNR (weight and input quantization "
    "noise together) by at least this many dB (with the guard); 'auto' is 1 for weights of 6 bits and more, 0 below.",
)
@_option(
    "--int8-ops/--layers-only",
    field="int8_ops",
    help="Also quantize the ops onnxruntime runs as integer kernels between the layers (Add, Mul, Concat, pooling, "
    "Sigmoid, and data movement), or only the layers' inputs and Conv outputs.",
)
@_option(
    "--int8-error-margin",
    field="int8_error_margin_db",
    type=NumberOrNone(),
    help="With --int8-ops, keep float a tensor whose estimated quantization SQNR is more than this many dB below "
    "the median of the layers' activations; 'none' never does.",
)
@_option(
    "--granularity",
    field="granularity",
    type=click.Choice(GRANULARITIES),
    help="One weight scale per output channel, or per tensor.",
)
@_option(
    "--rounding",
    field="rounding",
    type=click.Choice(ROUNDINGS),
    help="Round weights to the nearest level, or choose them by GPTQ on each layer's calibration inputs "
    "(lower output error); auto: hessian below 8 weight bits with --calib-data, nearest otherwise.",
)
@_option(
    "--rounding-inputs",
    field="rounding_inputs",
    type=click.Choice(ROUNDING_INPUTS),
    help="With Hessian rounding: round each layer again on the quantized model's own inputs, kept where its "
    "output gets closer to the float layer's (quantized), or round on the float model's inputs only (float).",
)
@_option(
    "--bias-correction/--no-bias-correction",
    field="bias_correction",
    help="Correct each layer's bias by the mean output shift its weight rounding causes on the calibration data.",
)
@_option(
    "--activation-type",
    field="activation_type",
    type=click.Choice(ACTIVATION_TYPES),
    help="uint8 with zero point (asymmetric) or int8 symmetric activations.",
)
@_option(
    "--equalize/--no-equalize",
    field="equalize",
    help="Cross-layer equalization first: layer pairs joined through Relu, LeakyRelu or nothing get balanced "
    "weight ranges (the same function).",
)
@_option(
    "--ocs-guard/--no-ocs-guard",
    field="ocs_guard",
    help="Split a layer only when that lowers its weight quantization error.",
)
@_option(
    "--wclip",
    field="wclip",
    type=click.Choice(CLIP_METHODS),
    help="Weight clip threshold method (searched on the split weights).",
)
@_option(
    "--aclip",
    field="aclip",
    type=click.Choice(CLIP_METHODS),
    help="Activation clip threshold method (on the calibration histograms).",
)
@_option("--percentile", field="percentile", type=float, help="Percentile of |x| for --wclip/--aclip percentile.")
@click.option(
    "--calib-data",
    type=click.Path(path_type=Path),
    help=".npz (one array per model input, first axis = samples) or a folder of .npz/.npy files.",
)
@_option("--calib-samples", field="calib_samples", type=int, help="Use at most this many calibration samples.")
@_option(
    "--calib-batch",
    field="calib_batch",
    type=int,
    help="Calibration batch size (a fixed batch dimension in the model wins).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Keep matching nodes float (glob on node name or op type; repeatable).",
)
@click.option(
    "--target-sqnr",
    type=float,
    metavar="DB",
    help="Keep float the fewest quantized tensors, most sensitive first, so that the output SQNR against the float "
    "model on the last --holdout-samples of --calib-data reaches DB; exit 7 (nothing written) when only a model "
    "with every activation or half the weights float would.",
)
@_option(
    "--sensitivity",
    is_flag=True,
    field="sensitivity",
    help="Measure the output SQNR of each quantized weight and activation alone on the held-out samples (in the "
    "report); implied by --target-sqnr.",
)
@_option(
    "--holdout-samples",
    field="holdout_samples",
    type=int,
    help="Samples at the end of --calib-data that calibration leaves to the sensitivity analysis (at most half).",
)
@_option("--seed", field="seed", type=int, help="Seed of the synthetic calibration inputs.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option(
    "--dump-after",
    multiple=True,
    metavar="PASS",
    help="Write the graph after this pass beside the output (repeatable).",
)
@click.option(
    "--reduce-range/--no-reduce-range",
    default=DEFAULTS.reduce_range,
    help="Every 8-bit weight on the +-63 grid / the full +-127 grid everywhere. Default at W8A8: a coarser scale only "
    "for the weight rows whose 16-bit pair sums could overflow onnxruntime's kernels on CPUs without VNNI.",
)
@click.option("--no-verify", is_flag=True, default=not DEFAULTS.verify, help="Skip the onnxruntime check of the output.")
@_option(
    "--min-kernel-agreement",
    field="min_kernel_agreement_db",
    type=NumberOrNone(),
    help="Fail (exit 6) when onnxruntime's integer kernels are further than this output SQNR (dB) from the "
    "QDQ arithmetic; 'none' only warns.",
)
@click.option(
    "--external-data",
    is_flag=True,
    default=DEFAULTS.external_data,
    help="Write the weights to OUTPUT.data beside the output (ONNX external data); "
    "always done for a model beyond protobuf's 2 GiB limit.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="A TOML file of compile options (the keys of CompileConfig, README \"Config files\"); flags given win.",
)
@click.option("--print-config", is_flag=True, help="Print the effective configuration as TOML and exit.")
@click.option("--list-passes", is_flag=True, help="Show the pass pipeline, with what each pass requires and produces, and exit.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@click.option("-v", "--verbose", count=True, help="Print per-pass progress.")
@click.option(
    "--log-format",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="Log lines for people, or one JSON object per line ({level, message}; errors add exit_code).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def compile_command(
    model,
    output,
    wbits,
    abits,
    ratio,
    act_ratio,
    split,
    equalize,
    ocs_guard,
    fold_copies,
    min_split_gain,
    int8_ops,
    int8_error_margin,
    granularity,
    rounding,
    rounding_inputs,
    bias_correction,
    activation_type,
    wclip,
    aclip,
    percentile,
    calib_data,
    calib_samples,
    calib_batch,
    exclude,
    target_sqnr,
    sensitivity,
    holdout_samples,
    seed,
    report_path,
    dump_after,
    reduce_range,
    no_verify,
    min_kernel_agreement,
    external_data,
    config_path,
    print_config,
    list_passes,
    quiet,
    verbose,
    log_format,
    debug,
):
    """Quantize MODEL (an .onnx file) into a QDQ model that onnxruntime runs on integer kernels."""
    if list_passes:
        _list_passes()
        return
    _configure_logging(quiet, verbose, log_format)
    flags = dict(
        wbits=wbits,
        abits=abits,
        ratio=ratio,
        act_ratio=act_ratio,
        split=split,
        equalize=equalize,
        ocs_guard=ocs_guard,
        fold_ocs_copies=fold_copies,
        min_split_gain_db=min_split_gain,
        int8_ops=int8_ops,
        int8_error_margin_db=int8_error_margin,
        granularity=granularity,
        rounding=rounding,
        rounding_inputs=rounding_inputs,
        bias_correction=bias_correction,
        activation_type=activation_type,
        wclip=wclip,
        aclip=aclip,
        percentile=percentile,
        calib_data=calib_data,
        calib_samples=calib_samples,
        calib_batch=calib_batch,
        exclude=tuple(exclude),
        target_sqnr_db=target_sqnr,
        sensitivity=sensitivity,
        holdout_samples=holdout_samples,
        seed=seed,
        reduce_range=reduce_range,
        verify=not no_verify,
        min_kernel_agreement_db=min_kernel_agreement,
        external_data=external_data,
        dump_after=tuple(dump_after),
    )
    config = _effective_config(flags, config_path)
    if print_config:
        from .config_file import config_toml

        click.echo(config_toml(config), nl=False)
        return
    if model is None:
        raise UsageError("missing MODEL: give the path of an .onnx file (see ocs-onnx compile --help)")
    output = output if output is not None else default_output_path(model)
    from .compiler import compile_file
    from .report import summary_text

    output_path, report = compile_file(model, output, config, report_path=report_path)
    log.info("%s", summary_text(report))
    written = [str(output_path)] + ([report["output_data"]] if report["output_data"] else [])
    log.info("wrote %s%s", " and ".join(written), f" and {report_path}" if report_path else "")


@cli.command("compare")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Inputs in --calib-data's format [default: seeded synthetic inputs].")
@click.option("--samples", type=int, default=64, show_default=True, help="Compare on at most this many samples.")
@click.option("--batch", type=int, default=16, show_default=True, help="Batch size (a fixed batch dimension in the models wins).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def compare_command(reference, candidate, data, samples, batch, seed, as_json, debug):
    """How far CANDIDATE's outputs are from REFERENCE's (a compiled model against its float model): per output,
    SQNR, largest difference, cosine similarity, argmax agreement."""
    import json

    from .compare import compare_models, comparison_text

    _configure_logging(False, 0)
    result = compare_models(reference, candidate, data, samples=samples, batch=batch, seed=seed)
    click.echo(json.dumps(result, indent=2) if as_json else comparison_text(result))


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib-data", type=click.Path(path_type=Path), help="Data in the compiler's format: adds the spread of each layer input's channels and the sensitivity ranking.")
@_option("--wbits", field="wbits", type=int, help="Weight bits the weight errors are measured at (2-8).")
@_option("--granularity", field="granularity", type=click.Choice(GRANULARITIES), help="Weight scales per output channel or per tensor.")
@click.option("--samples", type=int, default=32, show_default=True, help="Samples of --calib-data the input spreads are measured on.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def inspect_command(model, calib_data, wbits, granularity, samples, as_json, debug):
    """What MODEL's layers look like to a quantizer: weight outliers, the OCS ratio that halves each layer's weight
    error, and with data the spread of each layer input's channels and the sensitivity ranking."""
    import json

    from .inspection import inspect_model, inspection_text

    _configure_logging(True, 0)  # the compiles it runs say nothing; errors still do
    if isinstance(samples, bool) or samples < 1:
        raise UsageError(f"--samples must be a positive integer, got {samples!r}")
    result = inspect_model(model, calib_data, wbits=wbits, granularity=granularity, samples=samples)
    click.echo(json.dumps(result, indent=2, allow_nan=False) if as_json else inspection_text(result))


class Signalled(BaseException):
    """SIGINT or SIGTERM: unwinds the compile like an exception, so that every temporary file
    and folder it made is removed on the way out (not an Exception: nothing may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, frame):
    if owned.defer_signal(signum):
        return  # raised again at the end of a section that must not be split
    if Publication.done:
        return  # the output is in place: the command finishes, in moments
    raise Signalled(signum)


@contextlib.contextmanager
def _signals_unwind():
    """SIGINT and SIGTERM raise Signalled while the block runs (main thread only); whatever
    temporary an interrupted cleanup left registered is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    bus_error.install()  # a data file truncated under the compile: exit 3, not a bare SIGBUS
    bus_error.forget()
    Publication.done = False
    previous = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        try:
            with owned.signals_deferred():
                owned.remove_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _json_logs(args: list[str]) -> bool:
    return any(a == "--log-format=json" or (a == "--log-format" and b == "json") for a, b in zip(args, args[1:] + [""]))


def _say(line: str, code: int, as_json: bool) -> None:
    """The one line a failure ends in, ``ocs-onnx: <line>``, or its JSON form (the message
    without the 'error: ' that the level says)."""
    if as_json:
        message = line.removeprefix("error: ")
        click.echo(json.dumps({"level": "error", "message": one_line(message), "exit_code": code}), err=True)
    else:
        click.echo(one_line(f"ocs-onnx: {line}"), err=True)


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    as_json = _json_logs(args)
    try:
        with _signals_unwind():
            cli.main(args=argv, prog_name="ocs-onnx", standalone_mode=False)
        return 0
    except Signalled as exc:
        name = "interrupted" if exc.signum == signal.SIGINT else "terminated"
        _say(f"{name}; nothing was written", 128 + exc.signum, as_json)
        return 128 + exc.signum
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        _say("aborted", 130, as_json)
        return 130
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _say(f"error: {exc.format_message()}{hint}", USAGE, as_json)
        return USAGE
    except OcsError as exc:
        if debug:
            traceback.print_exc()
        _say(f"error: {exc.message}", exc.exit_code, as_json)
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted", 130, as_json)
        return 130
    except Exception as exc:  # a bug in ocs-onnx: say so in one line, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        # a pass's failure names the pass and the passes before it
        message = f": {first_line(exc)}" if str(exc).strip() else ""
        where = f" {exc}" if isinstance(exc, PassFailure) else f": {type(exc).__name__}{message}"
        _say(f"internal error{where} (rerun with --debug for the traceback)", INTERNAL, as_json)
        return INTERNAL


def entry_point() -> None:
    sys.exit(main())

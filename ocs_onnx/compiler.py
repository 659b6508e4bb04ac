"""The Python API: ``compile(model, ...) -> (quantized model, report)``, and ``compile_file``
which adds what a command-line run needs (paths, atomic writes, the JSON report)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.logger import G_LOGGER

from .config import CompileConfig
from . import owned
from .context import CompileContext, UniqueNames
from .errors import UsageError
from .gs_adapter import graph_to_model, parameter_count
from .loading import ModelSource, load_model
from .pass_manager import AfterEach, DumpAfter, Pass, PassManager, StopAfter, Timing, VerifyEach
from .passes import DEFAULT_PASSES
from .facts import CALIBRATION
from .readers import describe, is_data_object, spill_to_npz
from .report import build_report, report_json
from .sessions import check_onnxruntime_loads
from .external_data import data_file_name
from .writing import Publication, default_output_path, model_files, save_graph_atomic, write_files_atomic

# onnx-graphsurgeon logs to stdout; only its errors matter to our users.
G_LOGGER.severity = G_LOGGER.ERROR
# onnxruntime's own log lines (from sessions that onnx-graphsurgeon's constant folding opens, say)
# would break the one-line contract on stderr; every failure that matters is raised and reported.
ort.set_default_logger_severity(4)


def build_pass_manager(passes: list[Pass] | None = None) -> PassManager:
    """The pipeline (the default passes unless given); its order is checked here."""
    return PassManager(DEFAULT_PASSES if passes is None else passes)


def _check_pass_name(manager: PassManager, name: str, flag: str) -> None:
    if name not in manager.names:
        raise UsageError(f"{flag}: no pass named {name!r}; the passes are: {', '.join(manager.names)}")


def _config_from(config: CompileConfig | None, options: dict) -> CompileConfig:
    if config is None:
        try:
            return CompileConfig(**options)
        except TypeError as exc:
            raise UsageError(str(exc))
    return replace(config, **options) if options else config


def compile_graph(
    source: ModelSource,
    config: CompileConfig,
    dump_prefix: str | os.PathLike,
    scratch: Path | None,
    dumped: list[Path] | None = None,
) -> tuple[gs.Graph, CompileContext]:
    """Runs the passes on a loaded model: the compiled graph (weights still arrays, for a writer
    to stream) and the context the report is built from. Temporary files go to ``scratch``; the
    files ``--dump-after`` writes are appended to ``dumped``."""
    dumped = [] if dumped is None else dumped
    if is_data_object(config.calib_data):
        # read once, into a file that every pass may read again (ocs_onnx/readers.py)
        with owned.temporary_folder(scratch) as folder:
            spilled = replace(config, calib_data=spill_to_npz(config.calib_data, Path(folder)))
            graph, ctx = compile_graph(source, spilled, dump_prefix, scratch, dumped)
        ctx.config = config  # the report names the data as given
        calibration = ctx.facts.get(CALIBRATION)
        if calibration is not None and calibration.summary.get("source") == str(spilled.calib_data):
            calibration.summary["source"] = describe(config.calib_data)
        return graph, ctx
    if config.abits is not None or config.verify:
        check_onnxruntime_loads(source, config.abits)
    where = source.where if source.path is not None else "<in-memory model>"
    ctx = CompileContext(config, source=where, input_model=source, scratch=scratch, release=source.release)
    graph = source.graph()
    ctx.unique_name = UniqueNames(graph)
    manager = build_pass_manager()
    if config.stop_after is not None:
        _check_pass_name(manager, config.stop_after, "--stop-after")
    for name in config.dump_after:
        _check_pass_name(manager, name, "--dump-after")

    def own_dumps(paths: list[Path]) -> None:
        for path in paths:
            owned.own(path)  # until the compile succeeds: a failed one leaves no dumps
        dumped.extend(paths)

    def dump(name: str, g: gs.Graph) -> None:
        save_graph_atomic(g, dump_path(Path(f"{dump_prefix}.onnx"), name), config.external_data, own_dumps)

    instruments = [
        Timing(),
        VerifyEach(),
        DumpAfter(config.dump_after, dump),
        # pages of mapped weights that a pass read count as this process's memory until handed back
        AfterEach(source.release),
    ]
    if config.stop_after is not None:
        instruments.append(StopAfter(config.stop_after))
    # Non-finite weights and activations are handled where they matter (such layers stay float,
    # calibration ranges cover finite values); numpy's multi-line warnings about them are noise.
    with np.errstate(all="ignore"):
        graph = manager.run(graph, ctx, instruments)
    return graph, ctx


@contextlib.contextmanager
def _dumps_removed_on_failure() -> Iterator[list[Path]]:
    """The list compile_graph records its dumps in; a compile that fails (in a pass, or while
    writing its output) removes them: it leaves nothing behind."""
    dumped: list[Path] = []
    try:
        yield dumped
    except BaseException:
        for path in dumped:
            path.unlink(missing_ok=True)
        raise
    finally:
        for path in dumped:
            owned.disown(path)


def compile(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompileConfig | None = None,
    *,
    dump_prefix: str | os.PathLike = "model",
    **options,
) -> tuple[onnx.ModelProto, dict]:
    """Quantizes ``model`` (a path or a ModelProto) and returns (quantized model, report).

    Options are the fields of ``CompileConfig`` (``wbits=6, ratio=0.02, calib_data=...``).
    The input is never modified. For every pass named in ``dump_after`` the graph after it is
    written to ``<dump_prefix>.after-<pass>.onnx``.
    """
    config = _config_from(config, options)
    source = load_model(model)
    with _dumps_removed_on_failure() as dumped:
        graph, ctx = compile_graph(source, config, dump_prefix, scratch=None, dumped=dumped)
        output = graph_to_model(graph)
        return output, build_report(ctx, source, (parameter_count(graph), output.ByteSize()))


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def planned_outputs(output: Path, report: Path | None, dump_after: tuple[str, ...]) -> list[tuple[Path, str]]:
    """Every file a compile may write, with the option that names it: the output and its data
    file (written for --external-data or an output beyond 2 GiB), the report, and each dump with
    its data file."""
    outputs = [(output, "-o"), (output.with_name(data_file_name(output)), "-o (its data file)")]
    if report is not None:
        outputs.append((report, "--report"))
    for name in dump_after:
        dump = dump_path(output, name)
        outputs.append((dump, f"--dump-after {name}"))
        outputs.append((dump.with_name(data_file_name(dump)), f"--dump-after {name} (its data file)"))
    return outputs


def input_files(model_files: list[Path], calib_data: Path | None) -> list[tuple[Path, str]]:
    """Every file a compile reads, described: the model, its data files, the calibration data."""
    inputs = [(model_files[0], "the input model")] + [(p, "a data file of the input model") for p in model_files[1:]]
    if calib_data is not None and not is_data_object(calib_data):
        calib_data = Path(calib_data)
        files = sorted(p for p in calib_data.iterdir() if p.is_file()) if calib_data.is_dir() else [calib_data]
        inputs += [(path, "calibration data (--calib-data)") for path in files]
    return inputs


def check_output_paths(inputs: list[tuple[Path, str]], outputs: list[tuple[Path, str]]) -> None:
    """Fails before any work (exit 2) when an output could not be written, is not a regular file,
    would replace an input, or is the path of another output."""
    for index, (path, flag) in enumerate(outputs):
        if not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):  # also a read-only file system
            raise UsageError(f"{flag} {path}: folder {path.parent} is not writable")
        if len(os.fsencode(path.name)) + 16 > os.pathconf(path.parent, "PC_NAME_MAX"):  # + temporary suffix
            raise UsageError(f"{flag} {path}: file name too long for its file system")
        if path.is_dir():
            raise UsageError(f"{flag} {path}: is a folder")
        if path.exists() and not path.is_file():
            raise UsageError(f"{flag} {path}: is not a regular file (a device, pipe or socket); choose a file path")
        for existing, what in inputs:
            if _same_file(existing, path):
                raise UsageError(f"{flag} {path}: is {what}; choose another path")
        for other, other_flag in outputs[:index]:
            if _same_file(other, path):
                raise UsageError(f"{flag} {path}: is also the path of {other_flag}; choose another path")


def dump_path(output: Path, pass_name: str) -> Path:
    """Where --dump-after writes the graph after a pass: beside the output."""
    return Path(f"{Path(output).with_suffix('')}.after-{pass_name}.onnx")


def compile_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    config: CompileConfig | None = None,
    report_path: str | os.PathLike | None = None,
    **options,
) -> tuple[Path, dict]:
    """Compiles a model file; writes the output (default ``<stem>.q.onnx`` beside the input)
    and the JSON report atomically. Refuses to overwrite the input or its data files. Graphs
    dumped with ``dump_after`` land beside the output as ``<output stem>.after-<pass>.onnx``.
    With ``external_data`` (or for a model beyond protobuf's 2 GiB limit) the weights go to
    ``<output>.data`` beside the output."""
    config = _config_from(config, options)
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path is not None else default_output_path(input_path)
    report_path = Path(report_path) if report_path is not None else None
    for path, flag in ((input_path, "MODEL"), (output_path, "-o"), (report_path, "--report")):
        if path is not None and not path.name:  # '' (click makes it '.') or a path ending in '..'
            raise UsageError(f"{flag} {str(path)!r}: not a file path")
    outputs = planned_outputs(output_path, report_path, config.dump_after)
    check_output_paths(input_files([input_path], config.calib_data), outputs)
    source = load_model(input_path)
    # the data files are known once the model is read
    check_output_paths(input_files(source.input_files, config.calib_data), outputs)
    with _dumps_removed_on_failure() as dumped:
        graph, ctx = compile_graph(
            source, config, output_path.with_suffix(""), scratch=output_path.parent, dumped=dumped
        )
        files, size = model_files(graph, output_path, config.external_data)
        report = build_report(ctx, source, (parameter_count(graph), size))
        report["output"] = str(output_path)
        report["output_data"] = next((str(p) for p in files if p != output_path), None)
        if report_path is not None:
            files[report_path] = report_json(report).encode()
        # the model, its data and its report appear together or not at all
        write_files_atomic(files, when_written=Publication.mark_done)
    return output_path, report

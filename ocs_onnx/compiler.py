"""The Python API: ``compile(model, ...) -> (quantized model, report)``, and ``compile_file``
which adds what a command-line run needs (paths, atomic writes, the JSON report)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .config import CompileConfig
from .context import CompileContext
from .errors import UsageError
from .model_io import (
    default_output_path,
    graph_to_model,
    load_model,
    model_to_graph,
    save_model_atomic,
    write_bytes_atomic,
)
from .pass_manager import PassManager
from .report import build_report, report_json

# onnx-graphsurgeon logs to stdout; only its errors matter to our users.
G_LOGGER.severity = G_LOGGER.ERROR


def build_pass_manager(verify_each: bool = True) -> PassManager:
    from passes import DEFAULT_PASSES

    return PassManager(DEFAULT_PASSES, verify_each=verify_each)


def _config_from(config: CompileConfig | None, options: dict) -> CompileConfig:
    if config is None:
        try:
            return CompileConfig(**options)
        except TypeError as exc:
            raise UsageError(str(exc))
    return replace(config, **options) if options else config


def compile(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompileConfig | None = None,
    *,
    dump_dir: str | os.PathLike | None = None,
    **options,
) -> tuple[onnx.ModelProto, dict]:
    """Quantizes ``model`` (a path or a ModelProto) and returns (quantized model, report).

    Options are the fields of ``CompileConfig`` (``wbits=6, ratio=0.02, calib_data=...``).
    The input is never modified. ``dump_dir`` receives ``after-<pass>.onnx`` for every pass
    named in ``dump_after``.
    """
    config = _config_from(config, options)
    proto = load_model(model)
    is_path = not isinstance(model, onnx.ModelProto)
    ctx = CompileContext(
        config, source=str(model) if is_path else "<in-memory model>", model_dir=Path(model).parent if is_path else None
    )
    graph = model_to_graph(proto)
    ctx.reserve_names(graph)
    manager = build_pass_manager()

    def dump(name: str, g: gs.Graph) -> None:
        folder = Path(dump_dir) if dump_dir is not None else Path(".")
        save_model_atomic(graph_to_model(g), folder / f"after-{name}.onnx")

    graph = manager.run(graph, ctx, stop_after=config.stop_after, dump_after=config.dump_after, dump=dump)
    output = graph_to_model(graph)
    return output, build_report(ctx, proto, output)


def compile_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    config: CompileConfig | None = None,
    report_path: str | os.PathLike | None = None,
    **options,
) -> tuple[Path, dict]:
    """Compiles a model file; writes the output (default ``<stem>.q.onnx`` beside the input)
    and the JSON report atomically. Refuses to overwrite the input."""
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path is not None else default_output_path(input_path)
    if input_path.exists() and output_path.exists() and os.path.samefile(input_path, output_path):
        raise UsageError(f"output {output_path} is the input model; choose another -o path")
    if report_path is not None and Path(report_path).resolve() in (input_path.resolve(), output_path.resolve()):
        raise UsageError(f"--report {report_path} would overwrite a model file")
    dump_dir = output_path.parent
    model, report = compile(input_path, config, dump_dir=dump_dir, **options)
    report["output"] = str(output_path)
    save_model_atomic(model, output_path)
    if report_path is not None:
        write_bytes_atomic(Path(report_path), report_json(report).encode())
    return output_path, report

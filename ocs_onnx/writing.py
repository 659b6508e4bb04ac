"""Writing outputs atomically: a temporary file in the target folder, then a rename, so that a
reader never sees a half-written file and a failed compile leaves nothing behind. One-file
models are streamed tensor by tensor; large outputs put their weights in a data file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import Message

from . import bus_error, owned
from .errors import InvalidModelError, UsageError, first_line
from .external_data import EXTERNAL_MIN_BYTES, DataLayout, data_file_name
from .gs_adapter import (
    constant_array,
    constant_nbytes,
    export_without_arrays,
    graph_bytes,
    graph_to_model,
    large_constants,
    little_endian,
    onnx_type,
    stubbed,
)

# protobuf cannot serialize a message of 2 GiB or more; a model that big is written with its
# weights in a data file.
PROTOBUF_LIMIT = 2**31
# Room kept below that limit for everything but the weights' bytes (names, nodes, headers).
PROTOBUF_MARGIN = 64 << 20



def default_output_path(input_path: Path) -> Path:
    """model.onnx -> model.q.onnx, beside the input."""
    return input_path.with_name(input_path.stem + ".q.onnx")


# A file's contents: bytes, or a function that writes them to an open file (streaming).
Contents = bytes | Callable[[BinaryIO], None]


def model_files(graph: gs.Graph, path: Path, external_data: bool = False) -> tuple[dict[Path, Contents], int]:
    """The files of the model written at ``path``, and their total size in bytes.

    One protobuf file, unless ``external_data`` is asked for or the model would reach
    protobuf's 2 GiB limit: then every constant of ``EXTERNAL_MIN_BYTES`` or more goes to
    ``<path>.data`` beside it (its location in the model is that file name), streamed from
    the arrays when the file is written. The bytes depend only on the graph.
    """
    path = Path(path)
    if not external_data and graph_bytes(graph) < PROTOBUF_LIMIT - PROTOBUF_MARGIN:
        write, size = serialized_model(graph)
        return {path: write}, size
    layout = DataLayout(data_file_name(path))
    large = large_constants(graph, EXTERNAL_MIN_BYTES)
    places = {name: layout.add(name, constant_nbytes(c), lambda c=c: constant_array(c)) for name, c in large.items()}

    def stub(name: str, constant: gs.Constant) -> onnx.TensorProto:
        return layout.stub(name, onnx_type(constant), constant.shape, *places[name])

    with stubbed(large, stub):
        data = graph_to_model(graph).SerializeToString(deterministic=True)
    return {path: data, path.with_name(layout.location): layout.write}, len(data) + layout.size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int) -> bytes:
    """The key of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2)


def _fields(message: Message, keep: Callable[[int], bool]) -> bytes:
    """The message serialized with only the fields whose numbers ``keep`` accepts."""
    part = type(message)()
    part.CopyFrom(message)
    for descriptor, _ in message.ListFields():
        if not keep(descriptor.number):
            part.ClearField(descriptor.name)
    return part.SerializeToString(deterministic=True)


# Field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def serialized_model(graph: gs.Graph) -> tuple[Callable[[BinaryIO], None], int]:
    """A function writing the model's protobuf serialization to a file, and its size: the bytes
    of ``graph_to_model(graph).SerializeToString(deterministic=True)``, written tensor by tensor.

    protobuf serializes a message whole, into a buffer that grows as it goes and is then copied:
    with the model itself, that held the weights about four times over. Here the parts around
    the weights are serialized by protobuf (fields in field-number order, as its deterministic
    serialization writes them) and each weight's bytes go straight from its array to the file.
    """
    model, held = export_without_arrays(graph)
    graph_proto = model.graph
    entries: list[tuple[bytes, gs.Constant | None, int]] = []  # (bytes before the data, constant, data bytes)
    for tensor in graph_proto.initializer:
        head = tensor.SerializeToString(deterministic=True)
        constant = held.get(tensor.name)
        if constant is None:
            entries.append((_key(_GRAPH_INITIALIZER) + _varint(len(head)) + head, None, 0))
            continue
        length = constant_nbytes(constant)
        raw_key = _key(_TENSOR_RAW_DATA) + _varint(length)  # raw_data follows every field the tensor has
        body = len(head) + len(raw_key) + length
        entries.append((_key(_GRAPH_INITIALIZER) + _varint(body) + head + raw_key, constant, length))
    graph_head = _fields(graph_proto, lambda number: number < _GRAPH_INITIALIZER)
    graph_tail = _fields(graph_proto, lambda number: number > _GRAPH_INITIALIZER)
    graph_size = len(graph_head) + sum(len(prefix) + length for prefix, _, length in entries) + len(graph_tail)
    model_head = _fields(model, lambda number: number < _MODEL_GRAPH)
    model_tail = _fields(model, lambda number: number > _MODEL_GRAPH)
    graph_key = _key(_MODEL_GRAPH) + _varint(graph_size)

    def write(f: BinaryIO) -> None:
        f.write(model_head + graph_key + graph_head)
        for prefix, constant, _ in entries:
            f.write(prefix)
            if constant is not None:
                f.write(memoryview(little_endian(constant_array(constant)).reshape(-1)).cast("B"))
        f.write(graph_tail + model_tail)

    return write, len(model_head) + len(graph_key) + graph_size + len(model_tail)


class Publication:
    """Whether a compile's result is in place. The command line's interrupt handler reads it:
    once the result's files are renamed into place, an interrupt lets the command finish, so
    that "nothing was written" is never said of files that were."""

    done = False

    @classmethod
    def mark_done(cls, paths: list[Path]) -> None:
        cls.done = True


def write_files_atomic(
    files: dict[Path, Contents], when_written: Callable[[list[Path]], None] | None = None
) -> None:
    """Writes every file to a temporary file beside it first, and renames them only once all
    are written: a failure (full disk, interrupt) leaves none of them and no temporary file.
    A rename that fails after others succeeded rolls those back (the files they replaced
    return). A file's contents are bytes or a function writing them to the open file.
    ``when_written(paths)`` runs right after the renames, in the same uninterruptible step."""
    pending: dict[Path, str] = {}
    try:
        _write_pending(files, pending)
        temporaries = list(pending.values())
        with owned.signals_deferred():
            _rename_all(pending)
            for tmp_name in temporaries:
                owned.disown(tmp_name)  # renamed into place
            if when_written is not None:
                when_written(list(files))
    except OSError as exc:  # a full disk, a read-only file system, ...: the user's to fix
        _remove(pending.values())
        if exc.errno == errno.EFAULT and bus_error.shrunk_files():
            # write() given pages of a mapped input beyond its new end fails so, where a read of
            # them would be a bus error
            raise InvalidModelError("; ".join(bus_error.shrunk_files()) + "; nothing was written") from exc
        where = exc.filename or next(iter(pending), None) or next(iter(files), "")
        raise UsageError(f"cannot write {where}: {exc.strerror or first_line(exc)}; nothing was written") from exc
    except BaseException:
        _remove(pending.values())
        raise


def _remove(temporaries) -> None:
    for tmp_name in temporaries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        owned.disown(tmp_name)


def _rename_all(pending: dict[Path, str]) -> None:
    """Renames every temporary file to its path; on a failure, undoes the renames done."""
    backups: dict[Path, str | None] = {}  # path -> a hard link to the file it replaced, or None
    try:
        for path, tmp_name in list(pending.items()):
            backup = None
            if path.is_file():
                # a second name for the file being replaced (linking fails if the name exists)
                backup = tempfile.mktemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
                try:
                    os.link(path, backup)
                except OSError:  # a file system without hard links: a copy
                    shutil.copy2(path, backup)
            backups[path] = backup
            os.replace(tmp_name, path)
            del pending[path]
    except BaseException:
        for path, backup in backups.items():
            if path in pending:
                continue  # not renamed
            with contextlib.suppress(OSError):
                if backup is None:
                    os.unlink(path)
                else:
                    os.replace(backup, path)
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)


def _mode_for(path: Path) -> int:
    """The permissions a written file gets, as ``cp`` gives them: those of the file it replaces,
    else 0666 less the umask (mkstemp makes its file 0600, private whatever the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # Linux shows the umask in /proc without changing it; os.umask can only read it by setting
    # it, which races with other threads creating files.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _write_pending(files: dict[Path, Contents], pending: dict[Path, str]) -> None:
    """Writes each file's contents to a temporary file beside it (recorded in ``pending``)."""
    for path, contents in files.items():
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: folder {folder} does not exist")
        fd, tmp_name = owned.make_temporary_file(folder, prefix=f".{path.name}.", suffix=".tmp")
        pending[path] = tmp_name
        try:
            os.fchmod(fd, _mode_for(path))
            with os.fdopen(fd, "wb") as f:
                if callable(contents):
                    contents(f)
                else:
                    f.write(contents)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            exc.filename = exc.filename or str(path)  # the file the user asked for, not the temporary one
            raise


def save_graph_atomic(
    graph: gs.Graph, path: Path, external_data: bool = False, when_written: Callable[[list[Path]], None] | None = None
) -> list[Path]:
    """Writes the graph's model file (and data file); returns the paths written."""
    files = model_files(graph, path, external_data)[0]
    write_files_atomic(files, when_written)
    return list(files)


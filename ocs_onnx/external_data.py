"""ONNX external data: weights stored in files beside the model (the form of every model beyond
protobuf's 2 GiB limit).

Reading: every external tensor's location is checked before any byte is read (a relative path
that stays inside the model's folder, symlinks included, naming a regular file that holds the
tensor's bytes), then each data file is memory-mapped read-only once and the weights are numpy
views into it: nothing is copied, and the pages can be handed back to the kernel between passes
(``MappedData.release``).

Writing: the tensors go to one data file beside the model, ``<model file name>.data``, at
page-aligned offsets (so that readers such as onnxruntime can map them), streamed one tensor
at a time.
"""

from __future__ import annotations

import mmap
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

from .errors import InvalidModelError, first_line
from . import bus_error

# Tensors of these types are mapped as numpy views; others (bfloat16, float8, int4, ...) are
# read into the model with onnx's helper.
MAPPABLE_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
    TensorProto.INT8: np.int8,
    TensorProto.INT16: np.int16,
    TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64,
    TensorProto.UINT8: np.uint8,
    TensorProto.UINT16: np.uint16,
    TensorProto.UINT32: np.uint32,
    TensorProto.UINT64: np.uint64,
    TensorProto.BOOL: np.bool_,
}

# Tensors smaller than this stay inside the model file (onnx's own default threshold).
EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in a written data file are multiples of this (a memory page).
ALIGNMENT = 4096


def data_file_name(model_path: Path) -> str:
    """model.q.onnx -> model.q.onnx.data: the data file that goes with a written model."""
    return Path(model_path).name + ".data"


def all_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """(description, tensor) for every tensor that can hold data: initializers, sparse
    initializers and tensor attributes, in subgraphs too."""

    def graph_tensors(graph: onnx.GraphProto, where: str):
        for tensor in graph.initializer:
            yield f"{where}initializer", tensor
        for sparse in graph.sparse_initializer:
            yield f"{where}sparse initializer", sparse.values
            yield f"{where}sparse initializer", sparse.indices
        for node in graph.node:
            for attribute in node.attribute:
                what = f"{where}attribute {attribute.name!r} of node {node.name!r}"
                if attribute.HasField("t"):
                    yield what, attribute.t
                for tensor in attribute.tensors:
                    yield what, tensor
                subgraphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
                for subgraph in subgraphs:
                    yield from graph_tensors(subgraph, f"{where}subgraph {subgraph.name!r}: ")

    yield from graph_tensors(model.graph, "")


def _is_absolute(location: str) -> bool:
    return (
        PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).is_absolute()
        or bool(PureWindowsPath(location).drive)
        or location.startswith(("/", "\\"))
    )


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data, checked: the file (resolved, inside the model's folder) and
    the byte range."""

    what: str
    tensor: TensorProto
    path: Path
    offset: int
    length: int


def check_external_tensors(model: onnx.ModelProto, folder: Path, where: str) -> list[ExternalRef]:
    """Checks the location of every tensor with external data, without reading any data.

    Refused, with a one-line InvalidModelError naming the tensor and its location: an absolute
    path, a path that leaves the model's folder (through ``..`` or a symlink of the file or of
    a folder on the way), a missing file or one that is not a regular file, and a byte range
    beyond the end of the file or of another size than the tensor's type and shape need.
    """
    root = Path(os.path.realpath(folder))
    refs = []
    sizes: dict[Path, int] = {}
    for what, tensor in all_tensors(model):
        if not uses_external_data(tensor):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys are ignored, as onnx does
            try:
                info = ExternalDataInfo(tensor)
            except ValueError as exc:  # a negative or non-numeric offset or length
                raise InvalidModelError(f"{where}: {what} {tensor.name!r}: bad external data ({first_line(exc)})")
        location = info.location
        prefix = f"{where}: {what} {tensor.name!r}: external data location {location!r}"
        if not location:
            raise InvalidModelError(f"{where}: {what} {tensor.name!r}: external data without a location")
        if "\0" in location:
            raise InvalidModelError(f"{prefix} holds a NUL character")
        if _is_absolute(location):
            raise InvalidModelError(f"{prefix} is an absolute path; it must be relative to the model's folder")
        base = os.path.abspath(folder)
        joined = os.path.join(base, location.replace("\\", "/"))
        if os.path.commonpath([os.path.normpath(joined), base]) != base:
            raise InvalidModelError(f"{prefix} leaves the model's folder")
        # The path the system opens: symlinks resolved in order, a '..' after one included.
        resolved = Path(os.path.realpath(joined))
        if os.path.commonpath([resolved, root]) != str(root):
            raise InvalidModelError(f"{prefix} is a symlink (or under one) that leads outside the model's folder")
        try:
            status = os.stat(resolved)
        except FileNotFoundError:
            raise InvalidModelError(f"{prefix}: no such file beside the model")
        except OSError as exc:
            raise InvalidModelError(f"{prefix}: cannot read it ({first_line(exc)})")
        if not stat.S_ISREG(status.st_mode):
            raise InvalidModelError(f"{prefix} is not a regular file")
        size = sizes.setdefault(resolved, status.st_size)
        offset = info.offset or 0
        length = info.length if info.length is not None else max(size - offset, 0)
        if offset < 0 or length < 0:  # onnx before 1.21 accepts them
            raise InvalidModelError(f"{prefix}: negative offset {offset} or length {length}")
        if offset + length > size:
            raise InvalidModelError(
                f"{prefix}: offset {offset} + length {length} is beyond the end of the file ({size} bytes)"
            )
        needed = _data_bytes(tensor)
        if needed is not None and length != needed:
            raise InvalidModelError(
                f"{prefix} holds {length} bytes, but its type and shape {list(tensor.dims)} need {needed}"
            )
        refs.append(ExternalRef(what, tensor, resolved, offset, length))
    return refs


def _data_bytes(tensor: TensorProto) -> int | None:
    """Bytes of the tensor's raw data, for the types that are mapped (None for others: onnx's
    reader and numpy_helper check those once they are read)."""
    dtype = MAPPABLE_TYPES.get(tensor.data_type)
    if dtype is None:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass
class MappedData:
    """The external weights of a model as read-only numpy views of its memory-mapped data files."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    _maps: list[mmap.mmap] = field(default_factory=list)

    _bases: list[int] = field(default_factory=list)

    def release(self, array: np.ndarray | None = None) -> None:
        """Hands the pages read so far (of ``array`` only, when it is a view of a data file) back
        to the kernel: they stay in the page cache and are read again, usually without I/O, when
        next used, but no longer count as this process's memory."""
        if array is None:
            for mapped in self._maps:
                mapped.madvise(mmap.MADV_DONTNEED)
            return
        if not isinstance(array, np.ndarray) or array.size == 0:
            return
        low, high = _byte_bounds(array)
        for mapped, base in zip(self._maps, self._bases):
            if base <= low and high <= base + len(mapped):
                start = (low - base) // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, start, high - base - start)
                return


def _byte_bounds(array: np.ndarray) -> tuple[int, int]:
    """First and one-past-last address of an array's bytes (numpy's byte_bounds, which moved)."""
    low = high = array.__array_interface__["data"][0]
    for size, stride in zip(array.shape, array.strides):
        if stride < 0:
            low += (size - 1) * stride
        else:
            high += (size - 1) * stride
    return low, high + array.itemsize


def map_external_data(model: onnx.ModelProto, refs: list[ExternalRef]) -> MappedData:
    """Maps the initializers of ``refs`` (checked by ``check_external_tensors``); tensors of
    other kinds (attributes, subgraphs, sparse, types numpy cannot view) are read into the
    model instead. Initializers keep their external data fields; their values are the arrays.

    The files are read here, not by onnx's loader, which refuses every symlink, also one that
    stays in the model's folder."""
    mapped = MappedData()
    top_level = {id(t) for t in model.graph.initializer}
    maps: dict[Path, mmap.mmap | None] = {}
    for ref in refs:
        tensor = ref.tensor
        dtype = MAPPABLE_TYPES.get(tensor.data_type)
        if ref.path not in maps:
            try:
                maps[ref.path] = _map_file(ref.path)
            except OSError as exc:
                raise InvalidModelError(f"{ref.path.name}: cannot read the external data file ({first_line(exc)})")
            mapped.files.append(ref.path)
            if maps[ref.path] is not None:
                bus_error.watch(ref.path, len(maps[ref.path]))
                mapped._maps.append(maps[ref.path])
                mapped._bases.append(np.frombuffer(maps[ref.path], np.uint8).__array_interface__["data"][0])
        mapped.bytes += ref.length
        shape = tuple(int(d) for d in tensor.dims)
        if id(tensor) in top_level and dtype is not None:
            if ref.length == 0:
                mapped.arrays[tensor.name] = np.zeros(shape, dtype)
            else:
                view = np.frombuffer(
                    maps[ref.path],
                    dtype=np.dtype(dtype).newbyteorder("<"),
                    count=int(np.prod(shape)),
                    offset=ref.offset,
                )
                # (at an offset that is not a multiple of the element size, e.g. after an odd-sized
                # uint8 tensor, the view is unaligned: numpy and onnxruntime read it as it is)
                mapped.arrays[tensor.name] = view.reshape(shape)
        else:
            data = maps[ref.path]
            tensor.raw_data = bytes(data[ref.offset : ref.offset + ref.length]) if data is not None else b""
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    return mapped


def _map_file(path: Path) -> mmap.mmap | None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidModelError(f"{path.name}: external data is not a regular file")
        if os.fstat(fd).st_size == 0:
            return None
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class DataLayout:
    """Where each tensor goes in a data file, and a writer that streams them there."""

    location: str
    # (tensor name, offset, length, values getter) in file order
    entries: list[tuple[str, int, int, Callable[[], np.ndarray]]] = field(default_factory=list)
    size: int = 0

    def add(self, name: str, length: int, values: Callable[[], np.ndarray]) -> tuple[int, int]:
        offset = -(-self.size // ALIGNMENT) * ALIGNMENT
        self.entries.append((name, offset, length, values))
        self.size = offset + length
        return offset, length

    def stub(self, name: str, data_type: int, dims, offset: int, length: int) -> TensorProto:
        """A TensorProto of the given type and shape whose data is this file's byte range."""
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
        tensor.raw_data = b""  # set_external_data moves raw data out; there is none yet
        set_external_data(tensor, self.location, offset, length)
        tensor.ClearField("raw_data")
        return tensor

    def write(self, f: BinaryIO) -> None:
        position = 0
        for name, offset, length, values in self.entries:
            f.write(b"\0" * (offset - position))
            array = np.ascontiguousarray(values())
            data = array.astype(array.dtype.newbyteorder("<"), copy=False)  # raw data is little-endian
            if data.nbytes != length:
                raise RuntimeError(f"tensor {name!r} has {data.nbytes} bytes, {length} were laid out")
            f.write(memoryview(data.reshape(-1)).cast("B"))
            position = offset + length

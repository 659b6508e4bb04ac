"""Calibration data from Python objects: an onnxruntime ``CalibrationDataReader`` (anything with
``get_next()`` returning ``{input name: array}`` or None), an iterable of such dicts, or a
callable returning one dict per call (None at the end). Each dict is a batch, samples along the
first axis, as onnxruntime's readers give them.

The compiler reads its data several times (calibration, then again for rounding on the quantized
model's inputs or for the sensitivity analysis) and a reader can be read once: its batches are
streamed, once, to one .npz in a temporary folder (rows appended to a file per input, never all
in memory), which then goes through the same checks and the same batching as a file the user
gave (so that a reader and the same data in an .npz compile to the same bytes)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import CalibrationDataError

COPY_BLOCK = 1 << 20


def is_data_object(value) -> bool:
    """``calib_data`` is a reader, an iterable or a callable rather than a path."""
    if value is None or isinstance(value, (str, bytes, os.PathLike)):
        return False
    return hasattr(value, "get_next") or callable(value) or hasattr(value, "__iter__")


def describe(value) -> str:
    """How the report names the data."""
    if hasattr(value, "get_next"):
        return f"data reader {type(value).__name__}"
    return f"{'callable' if callable(value) else 'iterable'} {type(value).__name__}"


def _feeds(value) -> Iterator:
    if hasattr(value, "get_next"):
        while (feed := value.get_next()) is not None:
            yield feed
    elif callable(value):
        while (feed := value()) is not None:
            yield feed
    else:
        yield from value


def spill_to_npz(value, folder: Path) -> Path:
    """Streams the batches of ``value`` into ``folder``/calibration.npz; returns its path."""
    raw: dict[str, tuple] = {}  # name: (file, dtype, row shape, rows)
    try:
        for index, feed in enumerate(_feeds(value)):
            where = f"calibration data batch {index}"
            if not isinstance(feed, dict) or not feed:
                raise CalibrationDataError(f"{where}: not a dict of input name -> array ({type(feed).__name__})")
            if raw and set(feed) != set(raw):
                raise CalibrationDataError(f"{where}: inputs {sorted(feed)}, where the first batch had {sorted(raw)}")
            for name, array in feed.items():
                if not isinstance(name, str):
                    raise CalibrationDataError(f"{where}: input name {name!r} is not a string")
                array = np.asarray(array)
                if array.dtype == object or array.ndim == 0:
                    raise CalibrationDataError(f"{where}: input {name!r} is not a numeric array with a batch axis")
                if name not in raw:
                    raw[name] = (open(folder / f"{len(raw)}.raw", "wb"), array.dtype, array.shape[1:], 0)
                file, dtype, row_shape, rows = raw[name]
                if array.dtype != dtype or array.shape[1:] != row_shape:
                    raise CalibrationDataError(
                        f"{where}: input {name!r} has {array.dtype} {list(array.shape)}, where the first batch "
                        f"had {dtype} [batch, {', '.join(map(str, row_shape))}]"
                    )
                file.write(np.ascontiguousarray(array).tobytes())
                raw[name] = (file, dtype, row_shape, rows + array.shape[0])
    finally:
        for file, *_ in raw.values():
            file.close()
    if not raw:
        raise CalibrationDataError("calibration data: the reader gave no batches")
    path = folder / "calibration.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for index, (name, (_, dtype, row_shape, rows)) in enumerate(raw.items()):
            source = folder / f"{index}.raw"
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *row_shape)}
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member, open(source, "rb") as data:
                np.lib.format.write_array_header_1_0(member, header)
                while block := data.read(COPY_BLOCK):
                    member.write(block)
            source.unlink()
    return path

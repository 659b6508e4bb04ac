"""Temporary files and folders this process made and must not leave behind.

Python's unwinding removes them on every error and signal it sees (``finally`` blocks, context
managers). A bus error on a truncated data file (``bus_error.py``) ends the process without
unwinding: it removes what is registered here first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

_owned: dict[str, bool] = {}  # path -> is a folder


def own(path: str | os.PathLike, folder: bool = False) -> None:
    _owned[os.fspath(path)] = folder


def disown(path: str | os.PathLike) -> None:
    _owned.pop(os.fspath(path), None)


@contextlib.contextmanager
def temporary_folder(folder: str | os.PathLike | None = None, prefix: str = ".ocs-onnx-") -> Iterator[str]:
    """``tempfile.TemporaryDirectory``, registered while it exists."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=prefix) as tmp:
        own(tmp, folder=True)
        try:
            yield tmp
        finally:
            disown(tmp)


def remove_all() -> None:
    """Removes everything registered, ignoring what is already gone (for abrupt exits only)."""
    for path, is_folder in list(_owned.items()):
        with contextlib.suppress(OSError):
            if is_folder:
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    _owned.clear()

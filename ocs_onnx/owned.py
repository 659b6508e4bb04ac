"""Temporary files and folders this process made and must not leave behind, and the short
sections an interrupt must not split.

Python's unwinding removes temporaries on every error and signal it sees (``finally`` blocks).
Two things can still leave one behind, and this module closes both:

* an interrupt between creating a temporary and recording that it must be removed, or in the
  middle of removing it: creation and registration happen with signals deferred
  (``signals_deferred``), and whatever is still registered when the command ends on an error or
  a signal is removed then (``remove_all``);
* an exit that skips unwinding (a bus error on a truncated data file, ``bus_error.py``), which
  calls ``remove_all`` itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

_owned: dict[str, bool] = {}  # path -> is a folder
_deferring = 0
_deferred: list[int] = []


def own(path: str | os.PathLike, folder: bool = False) -> None:
    _owned[os.fspath(path)] = folder


def disown(path: str | os.PathLike) -> None:
    _owned.pop(os.fspath(path), None)


def remove_all() -> None:
    """Removes everything registered, ignoring what is already gone."""
    for path, is_folder in list(_owned.items()):
        with contextlib.suppress(OSError):
            if is_folder:
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    _owned.clear()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A section no interrupt may split: a signal handler that asks ``defer_signal`` inside it
    gets the signal raised again when the section ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _deferred:
            signum = _deferred[0]
            _deferred.clear()
            signal.raise_signal(signum)


def defer_signal(signum: int) -> bool:
    """For a signal handler: inside ``signals_deferred``, keeps the signal for its end (True)."""
    if _deferring:
        _deferred.append(signum)
        return True
    return False


def make_temporary_file(folder: str | os.PathLike, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp``, registered in the same uninterruptible step."""
    with signals_deferred():
        fd, path = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
        own(path)
    return fd, path


@contextlib.contextmanager
def temporary_folder(folder: str | os.PathLike | None = None, prefix: str = ".ocs-onnx-") -> Iterator[str]:
    """A temporary folder, registered from its creation until it is removed."""
    with signals_deferred():
        path = tempfile.mkdtemp(dir=folder, prefix=prefix)
        own(path, folder=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        disown(path)  # only once removed: an interrupt during the removal leaves it to remove_all

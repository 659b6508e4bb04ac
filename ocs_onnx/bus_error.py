"""A data file truncated while it is memory-mapped ends the compile with one line and exit 3,
not a bare SIGBUS.

The weights of a model with external data are read through memory maps (``external_data.py``):
no copy of them is held. If another process truncates a data file while it is mapped, reading a
page beyond the new end raises SIGBUS, which kills the process with no message, and Python's own
signal handling cannot help (its handler only sets a flag, and the faulting read would run
again forever). The command line installs a C-level handler (through ctypes) that names the
file that shrank, removes the process's temporary files (``owned.py``) and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal

from . import owned
from .errors import INVALID_MODEL, one_line

_watched: dict[str, int] = {}  # mapped data file -> its size when mapped
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int)
_installed = None  # the ctypes callback, kept alive while installed


def watch(path: str | os.PathLike, size: int) -> None:
    """Records a file mapped with ``size`` bytes."""
    _watched[os.fspath(path)] = size


def forget() -> None:
    """Drops the files recorded by an earlier compile (a process may run several)."""
    _watched.clear()


def shrunk_files() -> list[str]:
    """What changed in the mapped files, one phrase per file that shrank or is gone."""
    shrunk = []
    for path, size in _watched.items():
        try:
            now = os.stat(path).st_size
        except OSError:
            now = None
        if now is None or now < size:
            state = "is gone" if now is None else f"shrank from {size:,} to {now:,} bytes"
            shrunk.append(f"{path}: the data file {state} while it was being read")
    return shrunk


def message() -> str:
    cause = "; ".join(shrunk_files()) or "bus error (a memory-mapped file changed while it was being read)"
    return one_line(f"ocs-onnx: error: {cause}; nothing was written") + "\n"


def _on_bus_error(signum: int) -> None:
    try:
        os.write(2, message().encode("utf-8", "replace"))
        owned.remove_all()
    finally:
        os._exit(INVALID_MODEL)


def install() -> None:
    """SIGBUS ends the process with exit 3 and one line (main thread of the command line only)."""
    global _installed
    if _installed is not None or not hasattr(signal, "SIGBUS"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, _HANDLER_TYPE]
    except (OSError, AttributeError):
        return  # no C library to install it with: SIGBUS keeps its default action
    _installed = _HANDLER_TYPE(_on_bus_error)
    libc.signal(signal.SIGBUS, _installed)

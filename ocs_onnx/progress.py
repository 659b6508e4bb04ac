"""Progress of the long steps (calibration, Hessian rounding's second run, the sensitivity
analysis): a line redrawn in place when stderr is a terminal and the log shows information;
nothing otherwise (CI logs keep one line per step, with -v, and no carriage returns)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

log = logging.getLogger("ocs_onnx")

# set by the command line: JSON log records leave no room for a line drawn in place
enabled = True


def progress(label: str, total: int, unit: str = "") -> Callable[[int], None] | None:
    """A callback ``show(done)`` that redraws ``label: done/total`` on stderr, or None."""
    if not enabled or not sys.stderr.isatty() or not log.isEnabledFor(logging.INFO):
        return None

    def show(done: int) -> None:
        sys.stderr.write(f"\r{label}: {done}/{total}{unit}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show

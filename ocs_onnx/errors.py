"""Errors the compiler reports to its user, each with its documented exit code.

Anything raised as an ``OcsError`` is a problem with the input or the environment and is shown
as one line; anything else that escapes is a bug in ocs-onnx (exit code ``INTERNAL``).
"""

from __future__ import annotations

# Exit codes (documented in the README; scripts in a deployment pipeline rely on them).
INTERNAL = 1
USAGE = 2
INVALID_MODEL = 3
UNSUPPORTED_MODEL = 4
CALIBRATION_DATA = 5
VERIFICATION = 6
ACCURACY_TARGET = 7


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): one-line errors are the
    contract, and library messages often run to several lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(text: str) -> str:
    """The text with control characters escaped (a path may hold a newline): a message stays
    one line, whatever it quotes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class OcsError(Exception):
    """An error with a one-line message meant for the user, and an exit code."""

    exit_code = INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(OcsError):
    exit_code = USAGE


class InvalidModelError(OcsError):
    exit_code = INVALID_MODEL


class UnsupportedModelError(OcsError):
    exit_code = UNSUPPORTED_MODEL


class CalibrationDataError(OcsError):
    exit_code = CALIBRATION_DATA


class VerificationError(OcsError):
    exit_code = VERIFICATION


class AccuracyTargetError(OcsError):
    """``--target-sqnr`` cannot be met by a quantized model (nothing is written)."""

    exit_code = ACCURACY_TARGET

"""``--config FILE``: compile options kept in a TOML file under version control, with the keys of
``CompileConfig`` (``wbits = 6``, ``calib_data = "calib.npz"``) and the command line's spellings
for the values that mean "not set" (``abits = "none"``, ``min_split_gain_db = "auto"``).
Relative paths in it are relative to the file's folder. Flags given on the command line win."""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

from .config import CompileConfig
from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Fields a file cannot set: the API's callable metric (a file holds no code) and its max_drop.
API_ONLY = frozenset({"metric", "max_drop"})
# {field: the string that stands for None in it}, as the command line spells it
NONE_SPELLINGS = {
    "abits": "none",
    "min_split_gain_db": "auto",
    "int8_error_margin_db": "none",
    "min_kernel_agreement_db": "none",
    "reduce_range": "auto",
}
PATH_FIELDS = frozenset({"calib_data"})
TUPLE_FIELDS = frozenset({"exclude", "dump_after"})


def config_keys() -> list[str]:
    return [f.name for f in fields(CompileConfig) if f.name not in API_ONLY]


def read_config_file(path: str | Path) -> dict:
    """The options the file sets, {field: value}, checked against CompileConfig's fields (the
    values themselves are checked by CompileConfig, as the flags' are)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file")
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a folder")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot be read ({exc})")
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})")
    keys = config_keys()
    options = {}
    for key, value in table.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are: {', '.join(keys)}"
            raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
        if isinstance(value, dict):
            raise UsageError(f"--config {path}: {key!r} is a table; give it a value")
        if key in NONE_SPELLINGS and isinstance(value, str) and value.lower() == NONE_SPELLINGS[key]:
            value = None
        elif key in PATH_FIELDS and isinstance(value, str):
            value = path.parent / value
        elif key in TUPLE_FIELDS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"--config {path}: {key!r} must be a list of strings, got {value!r}")
            value = tuple(value)
        options[key] = value
    return options


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def config_toml(config: CompileConfig) -> str:
    """The configuration as a TOML file ``--config`` reads back to the same configuration; a
    field that is not set is a comment."""
    lines = []
    for key in config_keys():
        value = getattr(config, key)
        if value is None and key in NONE_SPELLINGS:
            value = NONE_SPELLINGS[key]
        if value is None:
            lines.append(f"# {key} is not set")
            continue
        lines.append(f"{key} = {_toml_value(str(Path(value).resolve()) if key in PATH_FIELDS else value)}")
    return "\n".join(lines) + "\n"

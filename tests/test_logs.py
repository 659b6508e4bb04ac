"""What a compile says on stderr: lines for people by default, one JSON object per line with
``--log-format json`` (errors with their exit code), nothing but errors with ``--quiet``, and a
progress line redrawn in place only on a terminal."""

from __future__ import annotations

import json
import shutil

import pytest

from ocs_onnx import progress
from ocs_onnx.cli import main

from models import digits


@pytest.fixture
def demo(tmp_path):
    path = tmp_path / "digits_cnn.onnx"
    shutil.copy(digits.MODEL, path)
    return path


def test_json_logs_are_one_object_per_line(demo, tmp_path, capsys):
    code = main(["compile", str(demo), "--calib-data", str(digits.CALIBRATION), "--log-format", "json", "-v",
                 "-o", str(tmp_path / "q.onnx")])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {r["level"] for r in records} <= {"debug", "info", "warning"}
    assert any(r["level"] == "debug" and r["message"].startswith("pass calibrate:") for r in records)
    assert records[-1] == {"level": "info", "message": f"wrote {tmp_path / 'q.onnx'}"}
    assert any("integer kernels" in r["message"] for r in records if r["level"] == "info")


@pytest.mark.parametrize("args, code", [(["--wbits", "9"], 2), (["--calib-data", "missing.npz"], 5)])
def test_json_errors_carry_the_exit_code(demo, capsys, args, code):
    assert main(["compile", str(demo), *args, "--log-format", "json"]) == code
    lines = capsys.readouterr().err.splitlines()
    record = json.loads(lines[-1])
    assert record["level"] == "error" and record["exit_code"] == code and not record["message"].startswith("error")
    assert all(json.loads(line) for line in lines)


def test_text_errors_stay_one_plain_line(demo, capsys):
    assert main(["compile", str(demo), "--wbits", "9"]) == 2
    assert capsys.readouterr().err == "ocs-onnx: error: --wbits must be an integer from 2 to 8, got 9\n"


def test_progress_is_drawn_only_on_a_terminal(monkeypatch, capsys):
    import logging
    import sys

    logging.getLogger("ocs_onnx").setLevel(logging.INFO)
    monkeypatch.setattr(progress, "enabled", True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.progress("calibrating", 4) is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    show = progress.progress("calibrating", 4, " samples")
    show(2)
    show(4)
    assert capsys.readouterr().err == "\rcalibrating: 2/4 samples\rcalibrating: 4/4 samples\n"
    monkeypatch.setattr(progress, "enabled", False)  # JSON logs
    assert progress.progress("calibrating", 4) is None

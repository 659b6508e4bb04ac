"""``--config FILE``: every compile option in a TOML file, the command line's flags over it, unknown
keys refused with the closest valid one, and ``--print-config`` printing what a compile would use."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from ocs_onnx.cli import main
from ocs_onnx.config import CompileConfig
from ocs_onnx.config_file import config_keys, read_config_file
from ocs_onnx.errors import USAGE

from models import digits

# every key, none at its default
EVERY_KEY = """
wbits = 6
abits = 6
ratio = 0.05
act_ratio = 0.01
split = "naive"
equalize = true
ocs_guard = false
min_split_gain_db = 0.5
fold_ocs_copies = false
granularity = "tensor"
rounding = "nearest"
rounding_inputs = "quantized"
bias_correction = true
int8_ops = false
int8_error_margin_db = "none"
activation_type = "int8"
wclip = "mse"
aclip = "kl"
percentile = 99.9
calib_data = "calib.npz"
calib_samples = 64
calib_batch = 8
exclude = ["fc", "Gemm"]
seed = 3
reduce_range = true
sensitivity = true
target_sqnr_db = 30.0
holdout_samples = 8
verify = false
min_kernel_agreement_db = "none"
external_data = true
stop_after = "calibrate"
dump_after = ["select-layers"]
"""


def test_a_file_can_set_every_key_the_api_has_but_the_metric_and_its_drop(tmp_path):
    path = tmp_path / "ocs.toml"
    path.write_text(EVERY_KEY)
    options = read_config_file(path)
    assert sorted(options) == sorted(config_keys())
    assert sorted(config_keys()) == sorted(f.name for f in fields(CompileConfig) if f.name not in ("metric", "max_drop"))
    defaults = CompileConfig()
    assert all(options[key] != getattr(defaults, key) for key in options)
    assert options["int8_error_margin_db"] is None and options["min_kernel_agreement_db"] is None
    assert options["calib_data"] == tmp_path / "calib.npz"  # relative to the file
    assert options["exclude"] == ("fc", "Gemm")


def _print_config(capsys, *args) -> str:
    assert main(["compile", "--print-config", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_the_command_lines_words_for_not_set_are_understood(tmp_path):
    path = tmp_path / "ocs.toml"
    path.write_text('abits = "none"\nmin_split_gain_db = "auto"\nreduce_range = "auto"\n')
    assert read_config_file(path) == {"abits": None, "min_split_gain_db": None, "reduce_range": None}


def test_flags_given_on_the_command_line_win_over_the_file(tmp_path, capsys):
    path = tmp_path / "ocs.toml"
    path.write_text('wbits = 6\nratio = 0.05\naclip = "kl"\nexclude = ["fc"]\n')
    printed = _print_config(capsys, "--config", path, "--wbits", "4", "--exclude", "conv1")
    assert "wbits = 4\n" in printed and "ratio = 0.05\n" in printed and 'aclip = "kl"\n' in printed
    assert 'exclude = ["conv1"]\n' in printed
    # a flag left at its default does not undo the file
    assert "wbits = 6\n" in _print_config(capsys, "--config", path, "--ratio", "0.02")


def test_the_printed_configuration_reads_back_to_itself(tmp_path, capsys):
    first = tmp_path / "first.toml"
    first.write_text(EVERY_KEY)
    printed = _print_config(capsys, "--config", first)
    second = tmp_path / "second.toml"
    second.write_text(printed)
    assert _print_config(capsys, "--config", second) == printed
    assert read_config_file(second) == {**read_config_file(first), "calib_data": (tmp_path / "calib.npz").resolve()}


def test_a_compile_from_a_file_is_the_compile_from_the_same_flags(tmp_path, capsys):
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(digits.MODEL, model)
    shutil.copy(digits.CALIBRATION, tmp_path / "calib.npz")
    path = tmp_path / "ocs.toml"
    path.write_text('wbits = 6\ncalib_data = "calib.npz"\nratio = 0.05\n')
    assert main(["compile", str(model), "--config", str(path), "-o", str(tmp_path / "a.onnx"),
                 "--report", str(tmp_path / "a.json")]) == 0  # fmt: skip
    assert main(["compile", str(model), "--wbits", "6", "--calib-data", str(tmp_path / "calib.npz"), "--ratio", "0.05",
                 "-o", str(tmp_path / "b.onnx")]) == 0  # fmt: skip
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["config"]["wbits"] == 6 and report["config"]["ratio"] == 0.05  # the effective configuration
    capsys.readouterr()


@pytest.mark.parametrize(
    "text, message",
    [
        ("wbit = 6\n", "unknown key 'wbit'; did you mean 'wbits'?"),
        ("zzz = 1\n", "unknown key 'zzz'; the keys are: wbits, abits"),
        ("metric = 'x'\n", "unknown key 'metric'"),
        ("wbits = \n", "not valid TOML"),
        ("wbits = 9\n", "--wbits must be an integer from 2 to 8, got 9 (from --config"),
        ("exclude = 'fc'\n", "'exclude' must be a list of strings"),
        ("[compile]\nwbits = 6\n", "unknown key 'compile'"),
    ],
)
def test_a_bad_file_is_a_usage_error_that_names_the_problem(text, message, tmp_path, capsys):
    path = tmp_path / "ocs.toml"
    path.write_text(text)
    assert main(["compile", str(digits.MODEL), "--config", str(path), "-o", str(tmp_path / "q.onnx")]) == USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "q.onnx").exists()


def test_a_missing_file_is_a_usage_error(tmp_path, capsys):
    assert main(["compile", "--print-config", "--config", str(tmp_path / "none.toml")]) == USAGE
    assert "no such file" in capsys.readouterr().err
    assert not Path(tmp_path / "none.toml").exists()

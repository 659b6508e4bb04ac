"""The command line: the main job, its outputs, and clean one-line failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import builders, digits
from ocs_onnx import errors
from ocs_onnx.cli import main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def demo(tmp_path) -> Path:
    """A private copy of the demo model (so outputs land in a fresh folder)."""
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(digits.MODEL, model)
    return model


def run_cli(*args, capsys=None):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def test_version_and_help_on_every_command(capsys):
    assert run_cli("--version", capsys=capsys)[1].strip() == "ocs-onnx, version 0.1.0"
    assert "compile" in run_cli("--help", capsys=capsys)[1]
    code, out, _ = run_cli("compile", "--help", capsys=capsys)
    assert code == 0 and "--wbits" in out and "--calib-data" in out


def test_list_passes_shows_the_pipeline_in_order(capsys):
    code, out, _ = run_cli("compile", "--list-passes", capsys=capsys)
    # one line per pass ("NN. name summary"), then its contract on an indented line
    names = [line.split()[1] for line in out.strip().splitlines() if not line.startswith(" " * 10)]
    assert code == 0
    assert names[:3] == ["upgrade-opset", "name-nodes", "constants-to-initializers"]
    # Activation OCS needs calibration statistics, and weight OCS splits the weights as widened by it.
    assert names.index("calibrate") < names.index("activation-ocs") < names.index("weight-ocs")
    assert names.index("weight-ocs") < names.index("clip-weights") < names.index("quantize-weights")
    assert names[-1] == "verify-onnxruntime"


def test_main_job_writes_model_beside_input_and_a_report(demo, tmp_path, capsys):
    before = sha256(demo)
    report_path = tmp_path / "report.json"
    code, _, err = run_cli(
        "compile",
        demo,
        "--wbits",
        6,
        "--ratio",
        0.02,
        "--calib-data",
        digits.CALIBRATION,
        "--report",
        report_path,
        capsys=capsys,
    )
    assert code == 0, err
    output = tmp_path / "digits_cnn.q.onnx"
    assert output.exists() and sha256(demo) == before
    assert "SQNR" in err and "integer kernels" in err
    report = json.loads(report_path.read_text())
    layer = report["layers"][0]
    assert set(layer) >= {"name", "op", "weight_shape", "channels_split", "bits", "scale", "sqnr_db"}
    assert set(report["totals"]) >= {"parameters_before", "parameters_after", "weight_overhead", "quantized_layers"}
    assert report["calibration"]["samples"] == 128 and report["calibration"]["source"] == str(digits.CALIBRATION)
    assert set(report["pass_seconds"]) >= {"weight-ocs", "calibrate", "verify-onnxruntime"}
    assert report["onnxruntime"]["integer_kernels"] == report["totals"]["quantized_layers"] == 6
    assert digits.accuracy(output) >= digits.accuracy(demo) - 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_quiet_prints_nothing_and_verbose_prints_passes(demo, tmp_path, capsys):
    code, out, err = run_cli("compile", demo, "-o", tmp_path / "q.onnx", "--abits", "none", "-q", capsys=capsys)
    assert code == 0 and out == "" and err == ""
    code, _, err = run_cli("compile", demo, "-o", tmp_path / "q.onnx", "--abits", "none", "-v", capsys=capsys)
    assert code == 0 and "pass weight-ocs" in err


def test_dump_after_writes_the_graph_after_that_pass(demo, tmp_path, capsys):
    code, _, err = run_cli("compile", demo, "--abits", "none", "--dump-after", "weight-ocs", capsys=capsys)
    assert code == 0, err
    dumped = onnx.load(str(tmp_path / "digits_cnn.q.after-weight-ocs.onnx"))
    assert any(n.op_type == "Concat" and n.name.endswith("_ocs_concat") for n in dumped.graph.node)
    assert not any(n.op_type == "DequantizeLinear" for n in dumped.graph.node)


def _old_opset_model(path: Path) -> Path:
    """Opset 7 BatchNormalization with spatial=0, which no later opset can express."""
    from onnx import TensorProto, helper, numpy_helper

    stats = ("scale", "bias", "mean", "var")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in stats]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", *stats], ["y"], spatial=0)],
        "old",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(np.ones(3, np.float32), n) for n in stats],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    onnx.save(model, str(path))
    return path


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


BAD_INPUTS = {
    "missing model": (lambda d: [d / "nope.onnx"], errors.INVALID_MODEL),
    "a folder": (lambda d: [d], errors.INVALID_MODEL),
    "empty file": (lambda d: [(d / "empty.onnx").write_bytes(b"") or d / "empty.onnx"], errors.INVALID_MODEL),
    "random bytes": (
        lambda d: [(d / "r.onnx").write_bytes(np.random.default_rng(0).bytes(4096)) or d / "r.onnx"],
        errors.INVALID_MODEL,
    ),
    "truncated model": (
        lambda d: [(d / "t.onnx").write_bytes(digits.MODEL.read_bytes()[:5000]) or d / "t.onnx"],
        errors.INVALID_MODEL,
    ),
    "opset that cannot be upgraded": (lambda d: [_old_opset_model(d / "old.onnx")], errors.UNSUPPORTED_MODEL),
    "wbits too high": (lambda d: [d / "digits_cnn.onnx", "--wbits", "9"], errors.USAGE),
    "wbits too low": (lambda d: [d / "digits_cnn.onnx", "--wbits", "1"], errors.USAGE),
    "abits too high": (lambda d: [d / "digits_cnn.onnx", "--abits", "16"], errors.USAGE),
    "negative ratio": (lambda d: [d / "digits_cnn.onnx", "--ratio", "-0.1"], errors.USAGE),
    "ratio above one": (lambda d: [d / "digits_cnn.onnx", "--ratio", "1.5"], errors.USAGE),
    "unknown option": (lambda d: [d / "digits_cnn.onnx", "--wbit", "4"], errors.USAGE),
    "unknown pass": (lambda d: [d / "digits_cnn.onnx", "--dump-after", "nonsense"], errors.USAGE),
    "output is the input": (lambda d: [d / "digits_cnn.onnx", "-o", d / "digits_cnn.onnx"], errors.USAGE),
    "output folder missing": (lambda d: [d / "digits_cnn.onnx", "-o", d / "no" / "out.onnx"], errors.USAGE),
    "calibration names differ": (
        lambda d: [
            d / "digits_cnn.onnx",
            "--calib-data",
            _write_npz(d / "c.npz", pixels=np.zeros((4, 1, 8, 8), np.float32)),
        ],
        errors.CALIBRATION_DATA,
    ),
    "calibration shape differs": (
        lambda d: [
            d / "digits_cnn.onnx",
            "--calib-data",
            _write_npz(d / "c.npz", image=np.zeros((4, 1, 9, 9), np.float32)),
        ],
        errors.CALIBRATION_DATA,
    ),
    "calibration rank differs": (
        lambda d: [
            d / "digits_cnn.onnx",
            "--calib-data",
            _write_npz(d / "c.npz", image=np.zeros((4, 8, 8), np.float32)),
        ],
        errors.CALIBRATION_DATA,
    ),
    "calibration file missing": (
        lambda d: [d / "digits_cnn.onnx", "--calib-data", d / "none.npz"],
        errors.CALIBRATION_DATA,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_exit_code_and_no_output(case, demo, tmp_path, capsys):
    make_args, expected_code = BAD_INPUTS[case]
    before = sha256(demo)
    listing_before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli("compile", *make_args(tmp_path), capsys=capsys)
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocs-onnx: error: "), err
    assert "Traceback" not in err
    new_files = sorted(
        set(p.name for p in tmp_path.iterdir())
        - set(listing_before)
        - {"c.npz", "empty.onnx", "r.onnx", "t.onnx", "old.onnx"}
    )
    assert new_files == []
    assert sha256(demo) == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--rounding", "nearest"],
        ["--rounding", "hessian", "--rounding-inputs", "quantized"],
        ["--rounding", "hessian", "--bias-correction"],
    ],
    ids=["nearest", "hessian-quantized-inputs", "hessian-bias-correction"],
)
def test_output_bytes_are_identical_across_processes_with_different_hash_seeds(demo, tmp_path, extra):
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"q{seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        cmd = [
            sys.executable,
            "-m",
            "ocs_onnx",
            "compile",
            str(demo),
            "-o",
            str(out),
            "--wbits",
            "5",
            "--calib-data",
            str(digits.CALIBRATION),
            "-q",
            *extra,
        ]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)  # cwd: the installed ocs_onnx, not the checkout's folder
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_traceback_is_shown_only_with_debug(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    cmd = [sys.executable, "-m", "ocs_onnx", "compile", str(bad)]
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)  # cwd: the installed ocs_onnx, not the checkout's folder
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == debug.returncode == errors.INVALID_MODEL
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr


def test_model_with_weights_in_constant_nodes_compiles_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "const.onnx"
    onnx.save(builders.constant_weights_net(), str(path))
    code, _, err = run_cli("compile", path, "--wbits", 5, capsys=capsys)
    assert code == 0, err
    assert "warning: no --calib-data" in err
    assert (tmp_path / "const.q.onnx").exists()


def test_activation_ocs_without_activation_quantization_is_a_usage_error(demo, capsys):
    code, _, err = run_cli("compile", demo, "--abits", "none", "--act-ratio", "0.02", capsys=capsys)
    assert code == errors.USAGE and "--act-ratio" in err and len(err.strip().splitlines()) == 1
    assert not (demo.parent / "digits_cnn.q.onnx").exists()

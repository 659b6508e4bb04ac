"""The installed layout: the passes install as ocs_onnx.passes, so that nothing named `passes`
at the top level (another distribution's, or a user's own folder) can shadow them."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx

from models import builders


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: the installed distribution, nothing from the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}


def _installed_distribution() -> importlib.metadata.Distribution:
    """The installed ocs-onnx, not the build metadata a checkout may hold (ocs_onnx.egg-info)."""
    root = Path(__file__).resolve().parents[1]
    path = [p for p in sys.path if Path(p or ".").resolve() != root]
    return next(iter(importlib.metadata.distributions(name="ocs-onnx", path=path)))


def test_the_distribution_installs_no_top_level_passes_package(tmp_path):
    files = _installed_distribution().files or []
    assert not [f for f in files if str(f).split("/")[0] == "passes"]
    probe = "import importlib.util, json; print(json.dumps([importlib.util.find_spec(n) is not None for n in ('passes', 'ocs_onnx.passes')]))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [False, True]


def test_compile_runs_from_a_folder_holding_its_own_passes_package(tmp_path):
    # A user's project with a passes/ package of its own, first on sys.path under `python -m`.
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("raise ImportError('the user project passes package')\n")
    onnx.save(builders.mlp_gemm(), str(tmp_path / "mlp.onnx"))
    result = subprocess.run(
        [sys.executable, "-m", "ocs_onnx", "compile", "mlp.onnx", "-q", "--calib-samples", "4"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlp.q.onnx").is_file()

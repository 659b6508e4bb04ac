"""Shared helpers: running models in onnxruntime and comparing outputs."""

from __future__ import annotations

import sys
from pathlib import Path

# The tests import ocs_onnx as a user does, from the installed distribution (pip install
# '.[test]', or -e for development), never from the checkout's folder: the checkout's root goes
# last on the path, where only models/ is found.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT] + [str(ROOT)]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from models import builders, digits  # noqa: E402

try:
    import ocs_onnx.passes  # noqa: F401
except ImportError as exc:
    pytest.exit(f"ocs_onnx is not installed ({exc}): run pip install '.[test]' first", returncode=4)


def run_model(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def max_relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |expected - actual| / max |expected|: one number for 'same function' checks."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(expected - np.asarray(actual, dtype=np.float64)).max() / max(np.abs(expected).max(), 1e-30))


def demo_feed(count: int = 64) -> dict[str, np.ndarray]:
    with np.load(digits.EVALUATION) as data:
        return {"image": data["image"][:count]}


# Every test model as (name, builder); the demo model rides along as a real trained network.
TEST_MODELS = dict(builders.ALL_TEST_MODELS)
TEST_MODELS["digits_cnn"] = lambda: onnx.load(str(digits.MODEL))


def feed_for(name: str, model: onnx.ModelProto, batch: int = 3, seq: int = 9) -> dict[str, np.ndarray]:
    if name == "digits_cnn":
        return demo_feed(batch)
    return builders.random_inputs(model, batch=batch, seq=seq, seed=1)


@pytest.fixture(params=sorted(TEST_MODELS))
def test_model(request):
    """(name, ModelProto) for every test model."""
    return request.param, TEST_MODELS[request.param]()

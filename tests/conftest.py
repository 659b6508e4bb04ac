"""Shared helpers: running models in onnxruntime and comparing outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import builders, digits


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

"""The demo model: a small CNN trained on scikit-learn's digits (tools/train_demo_model.py),
with its calibration set and held-out evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DEMO_DIR = Path(__file__).resolve().parent / "demo"
MODEL = DEMO_DIR / "digits_cnn.onnx"
CALIBRATION = DEMO_DIR / "digits_calib.npz"
EVALUATION = DEMO_DIR / "digits_eval.npz"


def accuracy(model: onnx.ModelProto | str | Path, data: Path = EVALUATION) -> float:
    """Top-1 accuracy in percent of a model (in memory or on disk) on the evaluation set."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    with np.load(data) as arrays:
        images, labels = arrays["image"], arrays["label"]
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == labels))

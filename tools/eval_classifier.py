"""Measure the top-1 accuracy of ONNX classifiers with onnxruntime.

The data file is an ``.npz`` holding one array per model input, named exactly
like that input (first axis = samples), plus the integer class labels in an
array named ``label``. ``tools/train_demo_model.py`` writes such a file for the
demo model (``models/demo/digits_eval.npz``).

Usage (from the repository root)::

    python tools/eval_classifier.py models/demo/digits_cnn.onnx \
        [OTHER_MODEL.onnx ...] --data models/demo/digits_eval.npz

prints one line per model, e.g.
``models/demo/digits_cnn.onnx: top-1 accuracy 97.80 % (500 samples)``.

Other tools in this folder can ``from eval_classifier import top1_accuracy``
(a script's own folder is on ``sys.path`` when it is run as
``python tools/SCRIPT.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

LABEL_KEY = "label"
DEFAULT_BATCH_SIZE = 256


def load_npz(npz_path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an .npz file into memory (and close the file)."""
    with np.load(npz_path) as data:
        return {name: data[name] for name in data.files}


def make_session(model_path: str | Path) -> ort.InferenceSession:
    # CPU only, so results do not depend on which accelerators a machine has.
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def predict(
    model_path: str | Path,
    inputs: dict[str, np.ndarray],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Run the model on ``inputs`` in batches and return its first output.

    ``inputs`` maps every model input name to an array whose first axis is the
    sample axis; extra entries (such as labels) are ignored.
    """
    session = make_session(model_path)
    input_names = [i.name for i in session.get_inputs()]
    missing = [name for name in input_names if name not in inputs]
    if missing:
        raise KeyError(f"{model_path}: data has no array for model input(s) {missing}; it has {sorted(inputs)}")
    num_samples = len(inputs[input_names[0]])
    # Batching keeps memory flat for large data files; models are expected to
    # have a dynamic batch dimension.
    outputs = []
    for start in range(0, num_samples, batch_size):
        feed = {name: inputs[name][start : start + batch_size] for name in input_names}
        outputs.append(session.run(None, feed)[0])
    return np.concatenate(outputs, axis=0)


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction (0..1) of samples whose highest-scoring class is the label."""
    predictions = np.argmax(logits.reshape(len(labels), -1), axis=1)
    return float(np.mean(predictions == labels))


def top1_accuracy(model_path: str | Path, npz_path: str | Path) -> float:
    """Top-1 accuracy (0..1) of the ONNX model on the labelled .npz data."""
    data = load_npz(npz_path)
    if LABEL_KEY not in data:
        raise KeyError(f"{npz_path}: no '{LABEL_KEY}' array (class labels)")
    logits = predict(model_path, data)
    return accuracy_from_logits(logits, data[LABEL_KEY])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="ONNX model file(s) to evaluate")
    parser.add_argument(
        "--data",
        required=True,
        help="labelled .npz: one array per model input plus 'label'",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    num_samples = len(load_npz(args.data)[LABEL_KEY])
    for model_path in args.models:
        accuracy = top1_accuracy(model_path, args.data)
        print(f"{model_path}: top-1 accuracy {100 * accuracy:.2f} % ({num_samples} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

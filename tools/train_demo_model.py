"""Train the small demo CNN on scikit-learn's digits and write it as ONNX.

The result is the project's *trained* demo model: a float32 classifier with
Conv -> BatchNormalization -> Relu chains, a residual Add (one activation feeds
two nodes) and a Gemm head, small enough to quantize and evaluate in seconds.

Writes into ``models/demo/`` (or ``--out-dir``):

* ``digits_cnn.onnx``   opset 13, input ``image`` [batch,1,8,8], output
  ``logits`` [batch,10]; BatchNormalization nodes are kept separate from the
  convolutions on purpose (the compiler has a pass that folds them).
* ``digits_calib.npz``  ``image`` (200,1,8,8) float32: calibration data in the
  compiler's format (one array per model input, first axis = samples), drawn
  from the training split.
* ``digits_eval.npz``   ``image`` (N,1,8,8) float32 and ``label`` (N,) int64:
  held-out samples never used for training or calibration.

Everything is seeded and PyTorch runs single-threaded with deterministic
algorithms, so a rerun gives byte-identical files (checked with torch 2.13.0,
CPU build; another torch version or CPU type may change the last bits of the
weights). The ONNX graph is built
with ``onnx.helper`` from the trained weights rather than with torch.onnx,
whose exporter needs extra packages.

Rerun (from the repository root; needs torch, onnx, onnxruntime, scikit-learn)::

    python tools/train_demo_model.py

Then check the written model with::

    python tools/eval_classifier.py models/demo/digits_cnn.onnx \
        --data models/demo/digits_eval.npz
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

# Same folder: importable as a plain module when run as `python tools/...`.
from eval_classifier import accuracy_from_logits, predict

SEED = 0
NUM_EVAL = 500
NUM_CALIB = 200
EPOCHS = 35
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
NUM_CLASSES = 10
BN_EPSILON = 1e-5  # torch's BatchNorm2d default; written into the ONNX nodes

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 13
IR_VERSION = 8  # opset 13 needs IR >= 7; 8 loads in every recent onnxruntime
PRODUCER_NAME = "ocs-onnx-tools"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "models" / "demo"
MODEL_FILE = "digits_cnn.onnx"
CALIB_FILE = "digits_calib.npz"
EVAL_FILE = "digits_eval.npz"


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Digits as (N,1,8,8) float32 in [0,1] and (N,) int64 labels."""
    digits = load_digits()
    # Raw pixels are integers 0..16.
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, digits.target.astype(np.int64)


def split_indices(num_samples: int) -> dict[str, np.ndarray]:
    """Deterministic train / calib / eval index split.

    Calibration samples are a subset of the training split: post-training
    quantization calibrates on data the model was fit to, while the eval split
    stays untouched by both training and calibration.
    """
    order = np.random.default_rng(SEED).permutation(num_samples)
    eval_idx, train_idx = order[:NUM_EVAL], order[NUM_EVAL:]
    calib_idx = train_idx[:NUM_CALIB]  # train_idx is already shuffled
    return {"train": train_idx, "calib": calib_idx, "eval": eval_idx}


# --------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------


def conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    # No conv bias: the following BatchNorm's shift makes it redundant.
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
    return conv, nn.BatchNorm2d(out_ch, eps=BN_EPSILON)


class DigitsCNN(nn.Module):
    """conv-bn-relu x2, a residual block, a stride-2 conv-bn-relu, GAP, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(1, 32)
        self.conv2, self.bn2 = conv_bn(32, 64)
        self.res_conv1, self.res_bn1 = conv_bn(64, 64)
        self.res_conv2, self.res_bn2 = conv_bn(64, 64)
        self.down_conv, self.down_bn = conv_bn(64, 64, stride=2)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.relu
        x = relu(self.bn1(self.conv1(x)))
        x = relu(self.bn2(self.conv2(x)))
        y = relu(self.res_bn1(self.res_conv1(x)))
        x = relu(self.res_bn2(self.res_conv2(y)) + x)
        x = relu(self.down_bn(self.down_conv(x)))
        x = x.mean(dim=(2, 3))  # global average pool + flatten
        return self.fc(x)


def make_reproducible() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    # One thread: float reductions split over threads can sum in a different
    # order from run to run, which changes the last bits of the weights.
    torch.set_num_threads(1)


def train(images: np.ndarray, labels: np.ndarray) -> DigitsCNN:
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    # Own seeded RNG for the batch order, independent of torch's global one.
    batch_rng = np.random.default_rng(SEED + 1)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.from_numpy(batch_rng.permutation(len(images)))
        total_loss = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        scheduler.step()
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}/{EPOCHS}  train loss {total_loss / len(images):.4f}")
    return model.eval()


def torch_logits(model: DigitsCNN, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


# --------------------------------------------------------------------------
# ONNX graph, built by hand from the trained weights
# --------------------------------------------------------------------------


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


class GraphBuilder:
    """Collects nodes and float32 initializers for a single-input graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, name: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        # Output tensors are named after their producing node, which keeps the
        # graph readable in viewers and in compiler debug dumps; the suffix keeps
        # tensor names distinct from node names for tools that mix the two.
        output = output or f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def conv(self, name: str, x: str, conv: nn.Conv2d) -> str:
        inputs = [x, self.weight(f"{name}.weight", to_numpy(conv.weight))]
        if conv.bias is not None:
            inputs.append(self.weight(f"{name}.bias", to_numpy(conv.bias)))
        return self.node(
            "Conv",
            name,
            inputs,
            kernel_shape=list(conv.kernel_size),
            strides=list(conv.stride),
            pads=list(conv.padding) * 2,  # ONNX: begins then ends
            dilations=list(conv.dilation),
            group=conv.groups,
        )

    def batchnorm(self, name: str, x: str, bn: nn.BatchNorm2d) -> str:
        inputs = [
            x,
            self.weight(f"{name}.scale", to_numpy(bn.weight)),
            self.weight(f"{name}.bias", to_numpy(bn.bias)),
            self.weight(f"{name}.mean", to_numpy(bn.running_mean)),
            self.weight(f"{name}.var", to_numpy(bn.running_var)),
        ]
        return self.node("BatchNormalization", name, inputs, epsilon=bn.eps)

    def gemm(self, name: str, x: str, fc: nn.Linear, output: str) -> str:
        inputs = [
            x,
            # torch stores Linear weights as (out, in): exactly what transB=1 expects.
            self.weight(f"{name}.weight", to_numpy(fc.weight)),
            self.weight(f"{name}.bias", to_numpy(fc.bias)),
        ]
        return self.node("Gemm", name, inputs, output=output, transB=1)


def build_onnx(model: DigitsCNN) -> onnx.ModelProto:
    g = GraphBuilder()

    def conv_bn_nodes(prefix: str, suffix: str, x: str) -> str:
        # Separate Conv and BatchNormalization nodes: folding them is the
        # compiler's job, so the demo model must still contain the pattern.
        conv_name, bn_name = f"{prefix}conv{suffix}", f"{prefix}bn{suffix}"
        conv, bn = getattr(model, conv_name), getattr(model, bn_name)
        return g.batchnorm(bn_name, g.conv(conv_name, x, conv), bn)

    x = g.node("Relu", "relu1", [conv_bn_nodes("", "1", INPUT_NAME)])
    x = g.node("Relu", "relu2", [conv_bn_nodes("", "2", x)])
    # Residual block: relu2's output has two consumers, res_conv1 and res_add.
    y = g.node("Relu", "res_relu1", [conv_bn_nodes("res_", "1", x)])
    x = g.node("Relu", "res_relu2", [g.node("Add", "res_add", [conv_bn_nodes("res_", "2", y), x])])
    x = g.node("Relu", "down_relu", [conv_bn_nodes("down_", "", x)])
    x = g.node("GlobalAveragePool", "gap", [x])
    x = g.node("Flatten", "flatten", [x], axis=1)
    g.gemm("fc", x, model.fc, output=OUTPUT_NAME)

    graph = helper.make_graph(
        g.nodes,
        "digits_cnn",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=g.initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        doc_string="Digits (8x8) CNN demo model; rebuild with tools/train_demo_model.py",
    )
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


# --------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez (uncompressed, loads with np.load), but byte-reproducible.

    np.savez stamps each zip member with the current time, so identical data
    gave different files on every run; here every member gets a fixed date.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16  # plain rw-r--r-- file
            # force_zip64 because np.savez does the same (numpy gh-10776).
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def check_onnx_matches_torch(model_path: Path, model: DigitsCNN, images: np.ndarray) -> np.ndarray:
    """Return onnxruntime's logits after checking them against torch's."""
    ort_logits = predict(model_path, {INPUT_NAME: images})
    max_diff = float(np.max(np.abs(ort_logits - torch_logits(model, images))))
    print(f"max |onnxruntime - torch| logit difference: {max_diff:.2e}")
    if not max_diff < 1e-4:
        raise RuntimeError(f"ONNX model disagrees with torch (max abs diff {max_diff:.2e})")
    return ort_logits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="where to write the model and data files (default: models/demo)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    make_reproducible()

    images, labels = load_data()
    split = split_indices(len(images))
    print(
        f"samples: train {len(split['train'])}, calib {len(split['calib'])} (subset of train), "
        f"eval {len(split['eval'])}"
    )

    start = time.perf_counter()
    model = train(images[split["train"]], labels[split["train"]])
    print(f"training time: {time.perf_counter() - start:.1f} s")
    num_params = sum(p.numel() for p in model.parameters())
    num_bn_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    print(f"parameters: {num_params} trainable (+{num_bn_stats} BatchNorm running statistics)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / MODEL_FILE
    onnx.save_model(build_onnx(model), model_path)

    eval_images, eval_labels = images[split["eval"]], labels[split["eval"]]
    save_npz(args.out_dir / CALIB_FILE, **{INPUT_NAME: images[split["calib"]]})
    save_npz(args.out_dir / EVAL_FILE, **{INPUT_NAME: eval_images, "label": eval_labels})

    ort_logits = check_onnx_matches_torch(model_path, model, eval_images)
    accuracy = accuracy_from_logits(ort_logits, eval_labels)
    print(f"onnxruntime float eval accuracy: {100 * accuracy:.2f} % ({len(eval_labels)} samples)")
    for name in (MODEL_FILE, CALIB_FILE, EVAL_FILE):
        print(f"wrote {args.out_dir / name} ({(args.out_dir / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()

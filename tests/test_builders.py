"""Tests for the ONNX test-model builders in models/builders.py."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from models.builders import ALL_TEST_MODELS, random_inputs

# Expected output shape of "y" for a given (batch, seq).
EXPECTED_Y_SHAPE = {
    "conv_bn_residual": lambda b, s: (b, 10),
    "mlp_gemm": lambda b, s: (b, 10),
    "transformer_block": lambda b, s: (b, s, 32),
    "constant_weights": lambda b, s: (b, 10),
    "token_embedding": lambda b, s: (b, s, 16),
    "runtime_reshape_head": lambda b, s: (b, 2),
}

NAMES = sorted(ALL_TEST_MODELS)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All constant tensors of a model: initializers and Constant node values."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def test_expected_shapes_cover_all_models():
    assert set(EXPECTED_Y_SHAPE) == set(ALL_TEST_MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_model_is_valid(name):
    model = ALL_TEST_MODELS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be non-empty and unique"
    for vi in list(model.graph.input) + list(model.graph.output):
        assert vi.type.tensor_type.elem_type != 0
        assert vi.type.tensor_type.HasField("shape")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 11)])
def test_model_runs_in_onnxruntime(name, batch, seq):
    model = ALL_TEST_MODELS[name]()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_inputs(model, batch=batch, seq=seq, seed=1)
    (y,) = sess.run(["y"], feeds)
    assert y.dtype == np.float32
    assert y.shape == EXPECTED_Y_SHAPE[name](batch, seq)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("name", NAMES)
def test_builders_are_deterministic(name):
    builder = ALL_TEST_MODELS[name]
    assert builder(seed=0).SerializeToString() == builder(seed=0).SerializeToString()
    assert builder(seed=0).SerializeToString() != builder(seed=1).SerializeToString()


@pytest.mark.parametrize("name", NAMES)
def test_weights_have_outliers(name):
    """Every weight matrix/kernel has values far out in the tail (OCS needs them)."""
    weights = {k: w for k, w in _weights(ALL_TEST_MODELS[name]()).items() if w.ndim >= 2}
    assert weights
    for wname, w in weights.items():
        robust_std = np.median(np.abs(w)) / 0.6745  # ~std of the bell-shaped bulk
        assert np.abs(w).max() > 4.0 * robust_std, wname


def test_random_inputs_dtypes_and_token_range():
    model = ALL_TEST_MODELS["token_embedding"]()
    feeds = random_inputs(model, batch=4, seq=9, int_high=50)
    ids = feeds["ids"]
    assert ids.dtype == np.int64 and ids.shape == (4, 9)
    assert ids.min() >= 0 and ids.max() < 50

    feeds = random_inputs(ALL_TEST_MODELS["conv_bn_residual"](), batch=3)
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (3, 3, 16, 16)


def test_model_specific_features():
    by_op = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731

    conv = ALL_TEST_MODELS["conv_bn_residual"]()
    groups = {a.i for n in conv.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"}
    assert 2 in groups and max(groups) > 2  # grouped and depthwise convs
    assert by_op(conv).count("BatchNormalization") == by_op(conv).count("Conv")

    mlp = ALL_TEST_MODELS["mlp_gemm"]()
    gemm_attrs = [
        {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in mlp.graph.node if n.op_type == "Gemm"
    ]
    assert any(a.get("transB", 0) == 0 for a in gemm_attrs)
    assert any(a.get("transB", 0) == 1 for a in gemm_attrs)
    assert any(a.get("alpha", 1.0) != 1.0 for a in gemm_attrs)

    tfm = ALL_TEST_MODELS["transformer_block"]()
    assert tfm.opset_import[0].version == 17
    assert "LayerNormalization" in by_op(tfm)
    init_names = {t.name for t in tfm.graph.initializer}
    matmuls = [n for n in tfm.graph.node if n.op_type == "MatMul"]
    assert sum(not (set(n.input) & init_names) for n in matmuls) == 2  # QK^T and attn.V

    const = ALL_TEST_MODELS["constant_weights"]()
    assert const.opset_import[0].version == 11
    assert len(const.graph.initializer) == 0
    assert by_op(const).count("Constant") == 4

"""OCS copies computed by the producer (Net2Net widening): the split layer's input copies come
from duplicated output rows of the layer before it, through per-channel ops, and the network
still computes the same function; where that cannot be done, the copies are made at run time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ocs_onnx
from ocs_onnx.channels import copy_runs

from .conftest import max_relative_error, run_model

C = 8  # channels between the two layers


class _Net:
    """A tiny graph builder: named nodes, seeded constants."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, name: str, values) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def weight(self, name: str, shape) -> str:
        return self.const(name, self.rng.normal(0, 0.5, shape) * self.rng.choice([1, 1, 1, 6], shape))

    def node(self, op: str, inputs, name: str | None = None, **attrs) -> str:
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, name: str, group: int = 1) -> str:
        w = self.weight(f"{name}.w", (cout, cin // group, 3, 3))
        b = self.const(f"{name}.b", self.rng.normal(0, 0.1, cout))
        return self.node("Conv", [x, w, b], name, pads=[1, 1, 1, 1], group=group)

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "net", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _image(name="x", c=4):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", c, 6, 6])


def _out(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_bn_relu6_conv() -> onnx.ModelProto:
    g = _Net()
    h = g.conv("x", 4, C, "conv1")
    h = g.node("Relu", [h])
    scale, shift = g.const("bn.s", g.rng.uniform(0.5, 2, C)), g.const("bn.b", g.rng.normal(0, 0.2, C))
    mean, var = g.const("bn.m", g.rng.normal(0, 0.2, C)), g.const("bn.v", g.rng.uniform(0.5, 2, C))
    h = g.node("BatchNormalization", [h, scale, shift, mean, var])  # not after a Conv: stays a node
    h = g.node("Clip", [h, g.const("lo", 0.0), g.const("hi", 6.0)])
    y = g.conv(h, C, 4, "conv2")
    return g.model([_image()], [_out(y, ["N", 4, 6, 6])])


def conv_hardswish_depthwise_conv() -> onnx.ModelProto:
    g = _Net(1)
    h = g.node("HardSwish", [g.conv("x", 4, C, "conv1")])
    h = g.node("HardSwish", [g.conv(h, C, C, "dw", group=C)])
    h = g.node("Mul", [h, g.const("per_channel", g.rng.uniform(0.5, 1.5, (C, 1, 1)))])
    y = g.conv(h, C, 4, "conv2")
    return g.model([_image()], [_out(y, ["N", 4, 6, 6])])


def silu() -> onnx.ModelProto:
    g = _Net(2)
    h = g.conv("x", 4, C, "conv1")
    h = g.node("Mul", [h, g.node("Sigmoid", [h])])
    h = g.node("PRelu", [h, g.const("slope", g.rng.uniform(0, 0.3, (C, 1, 1)))])
    y = g.conv(h, C, 4, "conv2")
    return g.model([_image()], [_out(y, ["N", 4, 6, 6])])


def squeeze_excite() -> onnx.ModelProto:
    g = _Net(3)
    h = g.node("Relu", [g.conv("x", 4, C, "conv1")])
    gate = g.node("Sigmoid", [g.conv(g.node("Relu", [g.conv(g.node("GlobalAveragePool", [h]), C, 2, "se1")]), 2, C, "se2")])
    y = g.conv(g.node("Mul", [h, gate]), C, 4, "conv2")
    return g.model([_image()], [_out(y, ["N", 4, 6, 6])])


def residual_add() -> onnx.ModelProto:
    g = _Net(4)
    h = g.node("Relu", [g.conv("x", 4, C, "conv1")])
    s = g.node("Add", [h, g.node("Relu", [g.conv(h, C, C, "conv2")])])
    y = g.conv(s, C, 4, "conv3")
    return g.model([_image()], [_out(y, ["N", 4, 6, 6])])


def shared_reader() -> onnx.ModelProto:
    """conv1's output read by the split conv2 and by a MaxPool on another branch."""
    g = _Net(5)
    h = g.node("Relu", [g.conv("x", 4, C, "conv1")])
    y = g.conv(h, C, 4, "conv2")
    z = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    return g.model([_image()], [_out(y, ["N", 4, 6, 6]), _out(z, ["N", C, 3, 3])])


def gemm_relu_gemm() -> onnx.ModelProto:
    g = _Net(6)
    h = g.node("Gemm", ["x", g.weight("fc1.w", (C, 16)), g.const("fc1.b", g.rng.normal(0, 0.1, C))], "fc1", transB=1)
    h = g.node("Relu", [h])
    y = g.node("Gemm", [h, g.weight("fc2.w", (C, 3)), g.const("fc2.b", np.zeros(3))], "fc2")
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], [_out(y, ["N", 3])])


def matmul_gelu_matmul() -> onnx.ModelProto:
    """A transformer MLP with the Erf form of GELU: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    g = _Net(7)
    h = g.node("MatMul", ["x", g.weight("up.w", (6, C))], "up")
    h = g.node("Add", [h, g.const("up.b", g.rng.normal(0, 0.1, C))])
    erf = g.node("Erf", [g.node("Div", [h, g.const("sqrt2", np.sqrt(2.0))])])
    gelu = g.node("Mul", [g.node("Mul", [h, g.const("half", 0.5)]), g.node("Add", [erf, g.const("one", 1.0)])])
    y = g.node("MatMul", [gelu, g.weight("down.w", (C, 6))], "down")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 6])]
    return g.model(inputs, [_out(y, ["N", 5, 6])])


# name: (builder, the split layer, the producer its copies fold into, or None: copied at run time)
PATTERNS = {
    "conv-bn-relu6-conv": (conv_bn_relu6_conv, "conv2", "conv1"),
    # not through depthwise Convs: measured slower than a copy at run time (ocs_onnx/widening.py)
    "conv-hardswish-depthwise-conv": (conv_hardswish_depthwise_conv, "conv2", None),
    "silu-prelu": (silu, "conv2", "conv1"),
    "squeeze-excite": (squeeze_excite, "conv2", None),
    "residual-add": (residual_add, "conv3", None),
    "read-by-another-op": (shared_reader, "conv2", None),
    "gemm-relu-gemm": (gemm_relu_gemm, "fc2", "fc1"),
    "matmul-gelu-matmul": (matmul_gelu_matmul, "down", "up"),
}


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    x = model.graph.input[0]
    shape = [3 if d.dim_param else d.dim_value for d in x.type.tensor_type.shape.dim]
    return {x.name: np.random.default_rng(9).normal(size=shape).astype(np.float32)}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_the_widened_network_computes_the_same_function(pattern):
    build, split_layer, producer = PATTERNS[pattern]
    model = build()
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.3, ocs_guard=False, stop_after="qa-split")
    layer = next(entry for entry in report["layers"] if entry["name"] == split_layer)
    assert layer["channels_split"] > 0
    assert layer["input_copies"] == (f"folded into {producer}" if producer else "run time")
    feed = _feed(model)
    for expected, actual in zip(run_model(model, feed), run_model(rewritten, feed)):
        assert expected.shape == actual.shape
        assert max_relative_error(expected, actual) < 1e-5


def one_channel_input_conv() -> onnx.ModelProto:
    """A first layer on a 1-channel graph input: splitting copies the whole input."""
    g = _Net(8)
    y = g.conv("x", 1, C, "conv1")
    return g.model([_image(c=1)], [_out(y, ["N", C, 6, 6])])


def test_a_copied_1_channel_input_is_concatenated_with_itself_without_a_slice():
    # on small tensors each node costs more than the copying it does: no Slice for a whole tensor
    model = one_channel_input_conv()
    rewritten, report = ocs_onnx.compile(model, abits=None, ratio=0.3, ocs_guard=False, stop_after="qa-split")
    assert report["layers"][0]["input_copies"] == "run time"
    concat = next(n for n in rewritten.graph.node if n.op_type == "Concat")
    assert list(concat.input) == ["x", "x"]
    assert not [n for n in rewritten.graph.node if n.op_type == "Slice"]
    feed = _feed(model)
    assert max_relative_error(run_model(model, feed)[0], run_model(rewritten, feed)[0]) < 1e-5


def test_consecutive_copied_channels_are_one_slice():
    assert copy_runs([3, 4, 5, 1, 1, 2]) == [(3, 6), (1, 2), (1, 3)]
    assert copy_runs([]) == []


def _dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{layer name: the weight it reads, dequantized}."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in dq:
            q, scale = (values[name] for name in dq[node.input[1]].input[:2])
            axis = next((a.i for a in dq[node.input[1]].attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            weights[node.name] = q.astype(np.float64) * scale.reshape(shape)
    return weights


@pytest.mark.parametrize("pattern", ["conv-bn-relu6-conv", "silu-prelu", "gemm-relu-gemm", "matmul-gelu-matmul"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_folding_changes_where_the_copy_is_made_not_the_numbers(pattern, granularity):
    build, _, producer = PATTERNS[pattern]
    model = build()
    options = dict(wbits=5, ratio=0.3, ocs_guard=False, wclip="mse", granularity=granularity, calib_samples=8)
    folded, folded_report = ocs_onnx.compile(model, **options)
    copied, copied_report = ocs_onnx.compile(model, fold_ocs_copies=False, **options)
    assert folded_report["totals"]["splits_folded"] >= 1 and copied_report["totals"]["splits_folded"] == 0
    copies = {entry["name"]: entry["output_channels_computed_twice"] for entry in folded_report["layers"]}
    assert copies[producer]
    out_axis = {"Conv": 0, "MatMul": 1}
    ops = {entry["name"]: entry["op"] for entry in folded_report["layers"]}
    copied_weights = _dequantized_weights(copied)
    for name, weight in _dequantized_weights(folded).items():
        axis = out_axis.get(ops[name], 0 if weight.shape[0] != copied_weights[name].shape[0] else 1)
        rows = weight.shape[axis] - len(copies[name])
        np.testing.assert_array_equal(np.take(weight, np.arange(rows), axis=axis), copied_weights[name])
    assert folded_report["activations"].keys() <= copied_report["activations"].keys()
    for name, entry in folded_report["activations"].items():
        assert (entry["scale"], entry["zero_point"]) == (
            copied_report["activations"][name]["scale"],
            copied_report["activations"][name]["zero_point"],
        )
    feed = _feed(model)
    for a, b in zip(run_model(folded, feed), run_model(copied, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # one run-time copy fewer (the first layer reads the graph input: its copies stay a Concat)
    def concats(m: onnx.ModelProto) -> int:
        return sum(n.op_type == "Concat" for n in m.graph.node)

    assert concats(folded) == concats(copied) - 1

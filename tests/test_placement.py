"""int8 beyond the layers: the ops onnxruntime runs as integer kernels get their inputs and
outputs quantized, so that they fuse (checked on the graph onnxruntime optimizes the output
into); data movement between layers runs on 8-bit values; normalization and attention-mask
arithmetic stay float; and the compiled model still computes what the float model does."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ocs_onnx
from ocs_onnx.passes.verify import optimized_op_counts
from ocs_onnx.quant import sqnr_db


class Net:
    """A small NCHW graph, built op by op."""

    def __init__(self, channels: int = 8, size: int = 16, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels, self.size = channels, size

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{len(self.nodes)}", **attrs))
        return out

    def const(self, values) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def conv(self, x: str, c_in: int, c_out: int, kernel: int = 3) -> str:
        w = self.const(self.rng.normal(size=(c_out, c_in, kernel, kernel)) / np.sqrt(c_in * kernel * kernel))
        b = self.const(self.rng.normal(size=c_out) * 0.1)
        return self.op("Conv", [x, w, b], pads=[kernel // 2] * 4)

    def model(self, y: str, out_shape: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y" if self.nodes[-1].output[0] == y else self.nodes[-1].output[0]
        graph = helper.make_graph(
            self.nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, self.size, self.size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _head(net: Net, h: str, channels: int) -> onnx.ModelProto:
    """Conv -> y, so that the op under test sits between two layers."""
    net.conv(h, channels, 4, kernel=1)
    return net.model(net.nodes[-1].output[0], ["N", 4, net.size, net.size])


def residual_block() -> onnx.ModelProto:
    net = Net()
    a = net.op("Relu", [net.conv("x", 3, 8)])
    b = net.conv(a, 8, 8)
    return _head(net, net.op("Relu", [net.op("Add", [a, b])]), 8)


def concat_of_two_branches() -> onnx.ModelProto:
    net = Net()
    a = net.op("Relu", [net.conv("x", 3, 8)])
    left, right = net.conv(a, 8, 8), net.conv(a, 8, 8, kernel=1)
    return _head(net, net.op("Concat", [left, right], axis=1), 16)


def maxpool_and_resize_between_convs() -> onnx.ModelProto:
    net = Net()
    a = net.op("Relu", [net.conv("x", 3, 8)])
    up = net.op("Resize", [a, "", net.const([1, 1, 2, 2])], mode="nearest")
    pooled = net.op("MaxPool", [up], kernel_shape=[2, 2], strides=[2, 2])
    return _head(net, pooled, 8)


def silu_block() -> onnx.ModelProto:
    net = Net()
    a = net.conv("x", 3, 8)
    return _head(net, net.op("Mul", [a, net.op("Sigmoid", [a])]), 8)


def se_block() -> onnx.ModelProto:
    net = Net()
    a = net.op("Relu", [net.conv("x", 3, 8)])
    squeezed = net.op("GlobalAveragePool", [a])
    gate = net.op("HardSigmoid", [net.conv(net.op("Relu", [net.conv(squeezed, 8, 4, kernel=1)]), 4, 8, kernel=1)])
    return _head(net, net.op("Mul", [a, gate]), 8)


def _compile(model: onnx.ModelProto, **options):
    compiled, report = ocs_onnx.compile(model, **options)
    return compiled, report, optimized_op_counts(compiled.SerializeToString())[1]


def _close_to_float(model: onnx.ModelProto, compiled: onnx.ModelProto, size: int = 16, min_db: float = 25.0) -> None:
    x = np.random.default_rng(7).normal(size=(4, 3, size, size)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    assert sqnr_db(run(model), run(compiled)) > min_db


@pytest.mark.parametrize(
    "make, kernels",
    [
        (residual_block, {"QLinearAdd": 1}),
        (concat_of_two_branches, {"QLinearConcat": 1}),
        (silu_block, {"QLinearSigmoid": 1, "QLinearMul": 1}),
        (se_block, {"QLinearGlobalAveragePool": 1, "QLinearMul": 1}),
    ],
    ids=["residual Add", "Concat of two Conv branches", "SiLU", "squeeze-and-excitation"],
)
@pytest.mark.parametrize("ratio", [0.0, 0.02])
def test_ops_between_layers_run_as_integer_kernels(make, kernels, ratio):
    model = make()
    compiled, report, ops = _compile(model, ratio=ratio)
    for kernel, count in kernels.items():
        # OCS copies made at run time add QLinearConcats of their own
        assert ops[kernel] == count or (ratio > 0 and kernel == "QLinearConcat" and ops[kernel] > count), ops
    assert Counter(report["integer_ops"].values()) == Counter(kernels)
    _close_to_float(model, compiled)


def _dequantized_inputs(model: onnx.ModelProto, ops: tuple[str, ...]) -> list[bool]:
    """For every node of ``ops`` in the graph onnxruntime optimizes the model into: is its input
    a DequantizeLinear output (float) rather than 8-bit data?"""
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        options.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    return [producers.get(n.input[0]) == "DequantizeLinear" for n in optimized.graph.node if n.op_type in ops]


MAXPOOL = ("MaxPool", "NhwcMaxPool")  # onnxruntime runs an 8-bit MaxPool in NHWC


def test_maxpool_and_resize_between_convs_move_8_bit_values():
    model = maxpool_and_resize_between_convs()
    compiled, report, ops = _compile(model, ratio=0.0)
    assert sum(ops[op] for op in MAXPOOL) == 1 and ops["Resize"] == 1
    assert _dequantized_inputs(compiled, MAXPOOL) == [False] and _dequantized_inputs(compiled, ("Resize",)) == [False]
    assert ops["DequantizeLinear"] == 1  # of the output, after the last Conv
    # the MaxPool's output (t3) shares the parameters of the Resize's input, the Relu's output (t1)
    entries = report["activations"]
    assert entries["t3"]["shares_parameters_of"] == "t1" and entries["t3"]["scale"] == entries["t1"]["scale"]
    _close_to_float(model, compiled)


def transformer_with_mask() -> onnx.ModelProto:
    """x [N, 16, 8] -> LayerNorm (as ReduceMean/Sub/Pow/Sqrt/Div) -> q, k, v projections ->
    softmax(q k^T / 4 + causal mask of -3.4e38) v -> projection -> + x."""
    rng = np.random.default_rng(1)
    d, seq = 8, 16
    nodes, inits = [], []

    def const(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def op(kind, inputs, out, **attrs):
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    mean = op("ReduceMean", ["x"], "ln_mean", axes=[-1])
    centered = op("Sub", ["x", mean], "ln_centered")
    var = op("ReduceMean", [op("Pow", [centered, const("two", 2.0)], "ln_square")], "ln_var", axes=[-1])
    std = op("Sqrt", [op("Add", [var, const("eps", 1e-5)], "ln_var_eps")], "ln_std")
    normalized = op("Div", [centered, std], "ln_normalized")
    h = op("Add", [op("Mul", [normalized, const("gamma", np.ones(d))], "ln_scaled"), const("beta", np.zeros(d))], "ln_out")
    q, k, v = (op("MatMul", [h, const(f"w_{n}", rng.normal(size=(d, d)) / 3)], n) for n in ("q", "k", "v"))
    scores = op("MatMul", [q, op("Transpose", [k], "k_t", perm=[0, 2, 1])], "scores")
    mask = np.triu(np.full((seq, seq), -3.4e38, dtype=np.float32), 1)
    masked = op("Add", [op("Mul", [scores, const("temperature", 0.25)], "scaled_scores"), const("mask", mask)], "masked")
    context = op("MatMul", [op("Softmax", [masked], "attention", axis=-1), v], "context")
    op("Add", [op("MatMul", [context, const("w_o", rng.normal(size=(d, d)) / 3)], "projected"), "x"], "y")
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, d])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layernorm_and_the_attention_mask_stay_float_and_the_projections_are_integer():
    model = transformer_with_mask()
    compiled, report, ops = _compile(model)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 4  # q, k, v and the output projection
    quantized = set(report["activations"])
    for float_tensor in ("ln_mean", "ln_centered", "ln_var", "ln_var_eps", "ln_std", "scores", "scaled_scores",
                         "masked", "attention"):  # fmt: skip
        assert float_tensor not in quantized
    assert not any(kernel == "QLinearSoftmax" for kernel in report["integer_ops"].values())
    x = np.random.default_rng(2).normal(size=(2, 16, 8)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    assert sqnr_db(run(model), run(compiled)) > 25


def test_a_tensor_a_masking_constant_dominates_is_kept_float_and_reported():
    net = Net()
    a = net.op("Relu", [net.conv("x", 3, 8)])
    shifted = net.op("Add", [a, net.const(-3.4e38)])  # a scalar constant: the Add would be integer
    model = _head(net, net.op("Max", [shifted, net.const(0.0)]), 8)
    compiled, report, _ = _compile(model, ratio=0.0)
    assert shifted in report["kept_float_activations"]
    assert "masking constant" in report["kept_float_activations"][shifted]
    assert shifted not in report["activations"] and report["integer_ops"] == {}


def test_a_tensor_whose_quantization_error_stands_out_is_kept_float():
    net = Net()
    a = net.conv("x", 3, 8)
    model = _head(net, net.op("Mul", [a, net.op("Sigmoid", [a])]), 8)
    _, report, _ = _compile(model, ratio=0.0, int8_error_margin_db=-100.0)  # every placed tensor "stands out"
    assert report["integer_ops"] == {} and set(report["kept_float_activations"]) == {"t1"}  # the Sigmoid's output
    assert all("dB below the median" in reason for reason in report["kept_float_activations"].values())
    _, report, _ = _compile(model, ratio=0.0, int8_error_margin_db=None)
    assert report["kept_float_activations"] == {} and len(report["integer_ops"]) == 2


def test_int8_placement_never_changes_the_layers_own_quantization_outside_a_concat():
    model = residual_block()
    _, with_ops, _ = _compile(model)
    _, layers_only, _ = _compile(model, int8_ops=False)
    for name, entry in layers_only["activations"].items():
        assert with_ops["activations"][name]["scale"] == entry["scale"]
    assert [layer["scale"] for layer in with_ops["layers"]] == [layer["scale"] for layer in layers_only["layers"]]
    assert Counter(with_ops["integer_ops"].values()) == Counter({"QLinearAdd": 1})


def test_a_concats_inputs_and_output_share_one_scale_that_covers_them_all():
    model = concat_of_two_branches()  # t2 and t3: the two branches' Conv outputs; t4: the Concat
    _, report, ops = _compile(model, ratio=0.0)
    entries = report["activations"]
    assert len({entries[t]["scale"] for t in ("t2", "t3", "t4")}) == 1 and ops["QLinearConcat"] == 1
    # unclipped, the scale spans the union of the branches' ranges (a uint8 grid over [lo, hi])
    _, report, _ = _compile(model, ratio=0.0, aclip="none")
    ranges = [report["activations"][t]["range"] for t in ("t2", "t3")]
    lo, hi = min(0.0, *(r[0] for r in ranges)), max(0.0, *(r[1] for r in ranges))
    assert report["activations"]["t4"]["scale"] == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_a_layer_input_stays_quantized_when_the_placed_tensor_before_it_is_kept_float():
    net = Net()
    gate = net.op("Sigmoid", [net.conv("x", 3, 8)])  # placed: QLinearSigmoid
    pooled = net.op("MaxPool", [gate], kernel_shape=[2, 2], strides=[2, 2])  # the head Conv's input
    net.conv(pooled, 8, 4, kernel=1)
    model = net.model(net.nodes[-1].output[0], ["N", 4, 8, 8])
    _, report, _ = _compile(model, ratio=0.0, int8_error_margin_db=-100.0)  # every placed tensor kept float
    assert "t1" in report["kept_float_activations"]
    assert pooled in report["activations"] and report["onnxruntime"]["integer_kernels"] == 2


def test_a_scalar_constant_that_is_also_a_graph_output_stays_exact_there():
    net = Net()
    a = net.op("Relu", [net.conv("x", 3, 8)])
    shift = net.const(0.75)
    net.conv(net.op("Add", [a, shift]), 8, 4)  # padded: the Add does not fold into it
    model = net.model(net.nodes[-1].output[0], ["N", 4, 16, 16])
    model.graph.output.append(helper.make_tensor_value_info(shift, TensorProto.FLOAT, []))
    compiled, report, _ = _compile(model, ratio=0.0)
    assert report["integer_ops"] == {"add2": "QLinearAdd"}
    assert [o.name for o in compiled.graph.output] == ["y", shift]
    assert shift in {t.name for t in compiled.graph.initializer}  # the constant itself, not a DequantizeLinear of it
    assert not any(shift in n.output for n in compiled.graph.node)
    x = np.random.default_rng(3).normal(size=(1, 3, 16, 16)).astype(np.float32)
    outputs = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert outputs[1] == np.float32(0.75)


def test_below_8_bit_activations_only_the_layers_are_quantized():
    model = residual_block()
    _, report, _ = _compile(model, abits=6)
    _, layers_only, _ = _compile(model, abits=6, int8_ops=False)
    assert report["integer_ops"] == {} and set(report["activations"]) == set(layers_only["activations"])

"""Small, realistic ONNX test models for the OCS quantization compiler.

Every public builder is a pure function: it takes ``seed`` plus a few size
keywords, draws all weights from ``np.random.default_rng(seed)`` and returns a
fresh ``onnx.ModelProto`` that passes ``onnx.checker.check_model`` and runs in
onnxruntime.  The same arguments always give byte-identical models.

Weights are bell-shaped (normal, std ``1/sqrt(fan_in)`` like a trained net)
with a handful of outliers: in a few *input channels* of every weight tensor,
a few values are set to 5-10 standard deviations (see :func:`_weight`).  That gives
Outlier Channel Splitting clear channels to split.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
DEFAULT_OPSET = 13
PRODUCER = "ocs-onnx.models.builders"

__all__ = [
    "ALL_TEST_MODELS",
    "conv_bn_residual_net",
    "constant_weights_net",
    "mlp_gemm",
    "random_inputs",
    "runtime_reshape_head_net",
    "token_embedding_net",
    "transformer_block",
]


# --------------------------------------------------------------------------
# Value helpers
# --------------------------------------------------------------------------


def _weight(
    rng: np.random.Generator,
    shape: Sequence[int],
    fan_in: int,
    in_axis: int,
    n_outlier_channels: int = 2,
    n_outliers_per_channel: int = 3,
) -> np.ndarray:
    """Weight tensor ~ N(0, std=1/sqrt(fan_in)) with outliers in a few input channels.

    ``n_outlier_channels`` distinct indices along ``in_axis`` are picked; in
    each of them ``n_outliers_per_channel`` entries are replaced by
    ``sign(w) * U(5, 10) * std``, i.e. 5-10 sigma outliers.  Returns float32.
    """
    std = 1.0 / np.sqrt(fan_in)
    w = rng.normal(0.0, std, size=tuple(shape))
    w_moved = np.moveaxis(w, in_axis, 0)  # view: channel axis first
    n_channels = w_moved.shape[0]
    channels = rng.choice(n_channels, size=min(n_outlier_channels, n_channels), replace=False)
    for c in channels:
        channel = w_moved[c]  # view into w
        k = min(n_outliers_per_channel, channel.size)
        picks = np.unravel_index(rng.choice(channel.size, size=k, replace=False), channel.shape)
        signs = np.where(channel[picks] < 0, -1.0, 1.0)
        channel[picks] = signs * rng.uniform(5.0, 10.0, size=k) * std
    return w.astype(np.float32)


def _bias(rng: np.random.Generator, n: int, std: float = 0.05) -> np.ndarray:
    """Small bias vector, float32."""
    return rng.normal(0.0, std, size=n).astype(np.float32)


def _bn_params(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    """Realistic BatchNormalization parameters (gamma ~ 1, var > 0)."""
    return {
        "scale": rng.normal(1.0, 0.1, size=c).astype(np.float32),
        "B": rng.normal(0.0, 0.1, size=c).astype(np.float32),
        "mean": rng.normal(0.0, 0.2, size=c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, size=c).astype(np.float32),
    }


# --------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------


class _GraphBuilder:
    """Collects nodes and initializers; hands out readable tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """Add a ``Constant`` node (value attribute) and return its output name."""
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=tensor))
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, **attrs) -> str:
        """Add a single-output node named ``name``; returns its output ``name_out``."""
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        opset: int = DEFAULT_OPSET,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, list(inputs), list(outputs), self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
        )
        onnx.checker.check_model(model)
        return model


def _rename_last_output(g: _GraphBuilder, new_name: str) -> None:
    """Give the last node's output the graph-output name (e.g. ``"y"``)."""
    g.nodes[-1].output[0] = new_name


def _conv_bn(
    g: _GraphBuilder,
    rng: np.random.Generator,
    x: str,
    prefix: str,
    c_in: int,
    c_out: int,
    kernel: int = 3,
    stride: int = 1,
    group: int = 1,
    relu: bool = True,
    conv_bias: bool = False,
) -> str:
    """Conv (same padding) + BatchNormalization (+ Relu)."""
    c_in_per_group = c_in // group
    fan_in = c_in_per_group * kernel * kernel
    # Depthwise: each filter sees one input channel, so put outliers per output channel.
    in_axis = 0 if c_in_per_group == 1 else 1
    w = g.init(f"{prefix}.conv.weight", _weight(rng, (c_out, c_in_per_group, kernel, kernel), fan_in, in_axis))
    conv_inputs = [x, w]
    if conv_bias:
        conv_inputs.append(g.init(f"{prefix}.conv.bias", _bias(rng, c_out)))
    pad = kernel // 2
    y = g.node(
        "Conv",
        conv_inputs,
        f"{prefix}/conv",
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad, pad, pad, pad],
        group=group,
    )
    bn = _bn_params(rng, c_out)
    bn_inputs = [y] + [g.init(f"{prefix}.bn.{k}", v) for k, v in bn.items()]
    y = g.node("BatchNormalization", bn_inputs, f"{prefix}/bn", epsilon=1e-5)
    if relu:
        y = g.node("Relu", [y], f"{prefix}/relu")
    return y


def _linear(g: _GraphBuilder, rng: np.random.Generator, x: str, prefix: str, d_in: int, d_out: int) -> str:
    """MatMul with a constant (d_in, d_out) weight + Add bias (torch Linear export)."""
    w = g.init(f"{prefix}.weight", _weight(rng, (d_in, d_out), d_in, in_axis=0))
    b = g.init(f"{prefix}.bias", _bias(rng, d_out))
    y = g.node("MatMul", [x, w], f"{prefix}/matmul")
    return g.node("Add", [y, b], f"{prefix}/add_bias")


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def conv_bn_residual_net(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    """Small ResNet-like CNN: x ["N",3,16,16] -> y ["N",10].

    Exercises: Conv+BN(+Relu) folding, a residual block whose input tensor
    has two consumers (conv branch and the skip Add), a stride-2 conv, a
    depthwise conv (group=2C), a grouped 1x1 conv with bias (group=2),
    GlobalAveragePool, Flatten and a Gemm classifier with transB=1.
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    c, c2 = channels, 2 * channels

    x = _conv_bn(g, rng, "x", "stem", 3, c)
    # Residual block: `x` feeds both block1/conv1 and the skip Add.
    h = _conv_bn(g, rng, x, "block1.0", c, c)
    h = _conv_bn(g, rng, h, "block1.1", c, c, relu=False)
    h = g.node("Add", [h, x], "block1/add")
    h = g.node("Relu", [h], "block1/relu")
    # Downsample 16x16 -> 8x8, then depthwise + grouped pointwise convs.
    h = _conv_bn(g, rng, h, "down", c, c2, stride=2)
    h = _conv_bn(g, rng, h, "dw", c2, c2, group=c2)
    h = _conv_bn(g, rng, h, "pw_grouped", c2, c2, kernel=1, group=2, conv_bias=True)
    # Head.
    h = g.node("GlobalAveragePool", [h], "head/gap")
    h = g.node("Flatten", [h], "head/flatten", axis=1)
    w = g.init("head.fc.weight", _weight(rng, (10, c2), c2, in_axis=1))
    b = g.init("head.fc.bias", _bias(rng, 10))
    g.node("Gemm", [h, w, b], "head/fc", transB=1)
    _rename_last_output(g, "y")

    return g.model(
        "conv_bn_residual_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )


def mlp_gemm(seed: int = 0, sizes: Sequence[int] = (32, 64, 64, 10)) -> onnx.ModelProto:
    """MLP of Gemm(+Relu) layers: x ["N",sizes[0]] -> y ["N",sizes[-1]].

    Exercises both Gemm weight layouts and the alpha attribute:
    layer 1 stores B as (K, N) with transB=0, all others as (N, K) with
    transB=1; the last layer has alpha=0.5, beta=1 (its weights are doubled
    so outputs keep a realistic scale).  The last Gemm has no activation.
    """
    if len(sizes) < 2:
        raise ValueError("sizes needs at least an input and an output size")
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    n_layers = len(sizes) - 1

    h = "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        trans_b = 0 if i == 1 else 1
        is_last = i == n_layers - 1
        alpha = 0.5 if is_last else 1.0
        w = _weight(rng, (n, k), k, in_axis=1) / alpha  # (N, K) layout
        if trans_b == 0:
            w = np.ascontiguousarray(w.T)  # (K, N) layout
        w_name = g.init(f"fc{i}.weight", w)
        b_name = g.init(f"fc{i}.bias", _bias(rng, n))
        attrs = {"transB": trans_b}
        if alpha != 1.0:
            attrs.update(alpha=alpha, beta=1.0)
        h = g.node("Gemm", [h, w_name, b_name], f"fc{i}/gemm", **attrs)
        if not is_last:
            h = g.node("Relu", [h], f"fc{i}/relu")
    _rename_last_output(g, "y")

    return g.model(
        "mlp_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])],
    )


def transformer_block(seed: int = 0, d_model: int = 32, n_heads: int = 2, d_ff: int = 64) -> onnx.ModelProto:
    """Post-LN transformer encoder block (opset 17): x ["batch","seq",d] -> y.

    Exercises: MatMul+Add linear layers with constant weights (Q/K/V/out,
    FFN), activation x activation MatMuls (Q.K^T and attn.V) that must not
    be treated as weight layers, Reshape with 0/-1 shape tensors for dynamic
    batch/seq, Transpose, Softmax, LayerNormalization and an Erf-based GELU.
    """
    if d_model % n_heads:
        raise ValueError("d_model must be divisible by n_heads")
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    d_head = d_model // n_heads

    split_heads = g.init("attn.split_heads_shape", np.array([0, 0, n_heads, d_head], dtype=np.int64))
    merge_heads = g.init("attn.merge_heads_shape", np.array([0, 0, -1], dtype=np.int64))
    scale = g.init("attn.scale", np.array(np.sqrt(d_head), dtype=np.float32))

    def heads(t: str, name: str, perm: list[int]) -> str:
        t = g.node("Reshape", [t, split_heads], f"attn/{name}_reshape")
        return g.node("Transpose", [t], f"attn/{name}_transpose", perm=perm)

    # Self-attention.
    q = heads(_linear(g, rng, "x", "attn.q_proj", d_model, d_model), "q", [0, 2, 1, 3])  # B,H,S,Dh
    k = heads(_linear(g, rng, "x", "attn.k_proj", d_model, d_model), "k", [0, 2, 3, 1])  # B,H,Dh,S
    v = heads(_linear(g, rng, "x", "attn.v_proj", d_model, d_model), "v", [0, 2, 1, 3])  # B,H,S,Dh
    scores = g.node("MatMul", [q, k], "attn/qk_matmul")  # B,H,S,S
    scores = g.node("Div", [scores, scale], "attn/scale")
    probs = g.node("Softmax", [scores], "attn/softmax", axis=-1)
    ctx = g.node("MatMul", [probs, v], "attn/av_matmul")  # B,H,S,Dh
    ctx = g.node("Transpose", [ctx], "attn/ctx_transpose", perm=[0, 2, 1, 3])
    ctx = g.node("Reshape", [ctx, merge_heads], "attn/ctx_reshape")  # B,S,D
    attn_out = _linear(g, rng, ctx, "attn.out_proj", d_model, d_model)
    h = g.node("Add", ["x", attn_out], "attn/residual")

    ln_scale = g.init("ln.weight", rng.normal(1.0, 0.1, size=d_model).astype(np.float32))
    ln_bias = g.init("ln.bias", _bias(rng, d_model))
    h = g.node("LayerNormalization", [h, ln_scale, ln_bias], "ln/layernorm", axis=-1, epsilon=1e-5)

    # FFN with GELU(x) = 0.5 * x * (1 + erf(x / sqrt(2))).
    f = _linear(g, rng, h, "ffn.fc1", d_model, d_ff)
    sqrt2 = g.init("ffn.gelu.sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    one = g.init("ffn.gelu.one", np.array(1.0, dtype=np.float32))
    half = g.init("ffn.gelu.half", np.array(0.5, dtype=np.float32))
    e = g.node("Div", [f, sqrt2], "ffn/gelu/div")
    e = g.node("Erf", [e], "ffn/gelu/erf")
    e = g.node("Add", [e, one], "ffn/gelu/add")
    e = g.node("Mul", [f, e], "ffn/gelu/mul")
    f = g.node("Mul", [e, half], "ffn/gelu/mul_half")
    f = _linear(g, rng, f, "ffn.fc2", d_ff, d_model)
    g.node("Add", [h, f], "ffn/residual")
    _rename_last_output(g, "y")

    return g.model(
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_model])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_model])],
        opset=17,
    )


def constant_weights_net(seed: int = 0, channels: int = 4, out_features: int = 10) -> onnx.ModelProto:
    """paddle2onnx/torch-style export at opset 11 with Constant-node weights.

    x ["N",3,8,8] -> Conv(3->C, 3x3, pad 1, bias) -> Relu -> Flatten ->
    MatMul -> Add bias -> y ["N",out_features].  There are no initializers:
    every weight and bias is the ``value`` of a ``Constant`` node.
    Exercises constant-to-initializer handling and opset upgrade.
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    flat = channels * 8 * 8

    w = g.const("conv.weight", _weight(rng, (channels, 3, 3, 3), 3 * 9, in_axis=1))
    b = g.const("conv.bias", _bias(rng, channels))
    h = g.node("Conv", ["x", w, b], "conv/conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.node("Relu", [h], "conv/relu")
    h = g.node("Flatten", [h], "flatten", axis=1)
    fc_w = g.const("fc.weight", _weight(rng, (flat, out_features), flat, in_axis=0))
    fc_b = g.const("fc.bias", _bias(rng, out_features))
    h = g.node("MatMul", [h, fc_w], "fc/matmul")
    g.node("Add", [h, fc_b], "fc/add_bias")
    _rename_last_output(g, "y")

    return g.model(
        "constant_weights_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])],
        opset=11,
    )


def runtime_reshape_head_net(seed: int = 0, channels: int = 16, classes: int = 2) -> onnx.ModelProto:
    """The head of a paddle2onnx classifier (PP-OCR's direction classifier) at opset 11.

    x ["N",3,8,8] -> Conv(3->C)+bias -> hard-swish as x*HardSigmoid(x) -> GlobalAveragePool ->
    Reshape to [N, -1] with the target shape computed at run time
    (Concat(Cast(Slice(Shape(h), 0, 1)), [-1])) -> MatMul -> Add bias -> Softmax -> y ["N",classes].
    Weights are Constant nodes. ONNX shape inference cannot tell the Reshape's output shape,
    only the target's length.
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    w = g.const("conv.weight", _weight(rng, (channels, 3, 3, 3), 27, in_axis=1))
    b = g.const("conv.bias", _bias(rng, channels))
    h = g.node("Conv", ["x", w, b], "conv/conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    gate = g.node("HardSigmoid", [h], "conv/hardsigmoid", alpha=1.0 / 6, beta=0.5)
    h = g.node("Mul", [h, gate], "conv/hardswish")
    h = g.node("GlobalAveragePool", [h], "head/gap")
    shape = g.node("Shape", [h], "head/shape")
    starts, ends, axes = (
        g.const(f"head.slice.{k}", np.array([v], np.int64)) for k, v in (("start", 0), ("end", 1), ("axis", 0))
    )
    batch = g.node("Slice", [shape, starts, ends, axes], "head/batch")
    batch = g.node("Cast", [batch], "head/batch_cast", to=TensorProto.INT64)
    rest = g.const("head.rest", np.array([-1], np.int64))
    target = g.node("Concat", [batch, rest], "head/target_shape", axis=0)
    h = g.node("Reshape", [h, target], "head/reshape")
    fc_w = g.const("fc.weight", _weight(rng, (channels, classes), channels, in_axis=0))
    fc_b = g.const("fc.bias", _bias(rng, classes))
    h = g.node("MatMul", [h, fc_w], "fc/matmul")
    h = g.node("Add", [h, fc_b], "fc/add_bias")
    g.node("Softmax", [h], "softmax", axis=1)
    _rename_last_output(g, "y")
    return g.model(
        "runtime_reshape_head_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        opset=11,
    )


def token_embedding_net(seed: int = 0, vocab: int = 50, d: int = 16) -> onnx.ModelProto:
    """Token embedding + projection: ids int64 ["batch","seq"] -> y ["batch","seq",d].

    Gather on a constant (vocab, d) embedding table, then MatMul with a
    constant (d, d) weight.  Exercises integer graph inputs: synthetic
    calibration data must produce token ids in [0, vocab).
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()

    table = g.init("embed.weight", _weight(rng, (vocab, d), 1, in_axis=1))  # std ~1 like nn.Embedding
    h = g.node("Gather", [table, "ids"], "embed/gather", axis=0)
    w = g.init("proj.weight", _weight(rng, (d, d), d, in_axis=0))
    g.node("MatMul", [h, w], "proj/matmul")
    _rename_last_output(g, "y")

    return g.model(
        "token_embedding_net",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
    )


def two_branch_conv_net(seed: int = 0, channels: int = 8, outlier_channel: int | None = None) -> onnx.ModelProto:
    """x ["N",3,8,8] -> stem Conv+BN+Relu -> two Convs reading the same activation (3x3 and 1x1),
    summed -> GlobalAveragePool -> Flatten -> Gemm -> y ["N",10].

    Exercises an activation with two Conv consumers (activation OCS widens both). With
    ``outlier_channel``, that channel of the shared activation is about 8x larger than the
    others (its stem BatchNorm scale and shift are multiplied by 8).
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    c = channels
    shared = _conv_bn(g, rng, "x", "stem", 3, c)
    if outlier_channel is not None:
        for key in ("stem.bn.scale", "stem.bn.B"):
            tensor = next(t for t in g.initializers if t.name == key)
            values = numpy_helper.to_array(tensor).copy()
            values[outlier_channel] *= 8.0
            tensor.CopyFrom(numpy_helper.from_array(values, key))
    a = _conv_bn(g, rng, shared, "branch_a", c, c, relu=False)
    b = _conv_bn(g, rng, shared, "branch_b", c, c, kernel=1, relu=False)
    h = g.node("Add", [a, b], "merge/add")
    h = g.node("GlobalAveragePool", [h], "head/gap")
    h = g.node("Flatten", [h], "head/flatten", axis=1)
    w = g.init("head.fc.weight", _weight(rng, (10, c), c, in_axis=1))
    g.node("Gemm", [h, w], "head/fc", transB=1)
    _rename_last_output(g, "y")
    return g.model(
        "two_branch_conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )


def stateful_lstm_net(seed: int = 0, features: int = 8, hidden: int = 16, classes: int = 4) -> onnx.ModelProto:
    """A streaming model without a batch axis, as voice-activity detectors are exported:
    x ["seq", features] and the LSTM's states h, c [1, 1, hidden] in; per-frame scores
    y ["seq", classes] (a projection, then a MatMul head) and the new states out. Its first
    axis is time, not samples: calibration data stacks whole feeds along an axis of its own."""
    rng = np.random.default_rng(seed)
    g = _GraphBuilder()
    w_in = g.init("proj.weight", _weight(rng, (features, features), features, in_axis=0))
    x = g.node("MatMul", ["x", w_in], "proj/matmul")
    axes = g.init("axes", np.array([1], dtype=np.int64))
    x3 = g.node("Unsqueeze", [x, axes], "lstm/unsqueeze")
    w = g.init("lstm.W", (rng.normal(size=(1, 4 * hidden, features)) / np.sqrt(features)).astype(np.float32))
    r = g.init("lstm.R", (rng.normal(size=(1, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32))
    b = g.init("lstm.B", (0.1 * rng.normal(size=(1, 8 * hidden))).astype(np.float32))
    g.nodes.append(
        helper.make_node("LSTM", [x3, w, r, b, "", "h", "c"], ["lstm_y", "h_out", "c_out"], name="lstm", hidden_size=hidden)
    )
    y = g.node("Squeeze", ["lstm_y", g.init("squeeze_axes", np.array([1, 2], dtype=np.int64))], "lstm/squeeze")
    head = g.init("head.weight", _weight(rng, (hidden, classes), hidden, in_axis=0))
    g.node("MatMul", [y, head], "head/matmul")
    _rename_last_output(g, "y")
    return g.model(
        "stateful_lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", features]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", classes]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 1, hidden]),
         helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [1, 1, hidden])],
    )  # fmt: skip


ALL_TEST_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_residual": conv_bn_residual_net,
    "mlp_gemm": mlp_gemm,
    "transformer_block": transformer_block,
    "constant_weights": constant_weights_net,
    "token_embedding": token_embedding_net,
    "runtime_reshape_head": runtime_reshape_head_net,
}


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def random_inputs(
    model: onnx.ModelProto,
    batch: int = 2,
    seq: int = 7,
    seed: int = 0,
    int_high: int = 50,
) -> dict[str, np.ndarray]:
    """A valid onnxruntime feed for ``model``'s graph inputs.

    Dynamic dims (dim_param or unknown): the first one becomes ``batch``,
    later ones ``seq``.  Float inputs ~ N(0, 1); integer inputs are uniform
    in ``[0, int_high)`` (pass the vocabulary size for token-id inputs).
    Graph inputs that are also initializers are skipped.
    """
    rng = np.random.default_rng(seed)
    initializer_names = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in initializer_names:
            continue
        tensor_type = vi.type.tensor_type
        shape = []
        seen_dynamic = False
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            else:
                shape.append(seq if seen_dynamic else batch)
                seen_dynamic = True
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, int_high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise NotImplementedError(f"input {vi.name!r}: unsupported dtype {dtype}")
    return feeds

"""The facts passes hand to each other: each one named, typed, written by exactly one pass.

A pass declares the facts it requires and the facts it produces (``Pass.requires``,
``Pass.produces``); the pass manager checks the order when the pipeline is built and, while it
runs, lets a pass read only what it declared it requires and write only what it produces, once.

A fact may refer to the graph. ``Binding.OBJECTS`` facts hold the graph's node and tensor
objects: a pass that replaces the graph (returns a new one) leaves them pointing into a graph
that no longer runs, so they are invalidated. ``Binding.NAMES`` facts refer to tensors and
nodes by name: they survive a replaced graph with the same names (shape inference), not a pass
that rewrites the graph's structure (folding, fusing). This is LLVM's preserved-analyses rule
with the preservation written once, per fact, rather than in every pass.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .calibration import ReferenceBatch
from .hessian import InputGram, InputLayout
from .histogram import ChannelHistograms, SymmetricHistogram
from .quant import ActivationQParams
from .sensitivity import Candidate


class Binding(enum.Enum):
    NONE = "none"
    NAMES = "names"
    OBJECTS = "objects"


@dataclass(frozen=True)
class Fact:
    name: str
    binding: Binding
    doc: str  # "type: meaning"


# --------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One Conv/Gemm/MatMul whose weight gets quantized, as select-layers found it."""

    node: gs.Node
    # The constant the layer read when it was selected, and its values (after BatchNorm
    # folding, before any OCS; the OCS passes record the constants they give it).
    weight: gs.Constant
    model_weight: np.ndarray
    # Axes of the weight tensor: input channels (split along it) and output channels
    # (per-channel scales along it).
    weight_in_axis: int
    weight_out_axis: int
    # Axis of the layer's data input that carries the input channels.
    input_channel_axis: int
    # Why OCS may not split this layer (None: it may).
    split_refused: str | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def splittable(self) -> bool:
        return self.split_refused is None


@dataclass(frozen=True)
class ActivationPlan:
    """Activation tensors to quantize, {tensor: tensor whose statistics it uses} in graph order
    (a tensor behind a data-movement op shares the parameters of the tensor before it), and the
    tensors activation OCS may split, {tensor: (channel axis, channels)}."""

    tensors: dict[str, str]
    split_candidates: dict[str, tuple[int, int]] = field(default_factory=dict)
    # What the int8 placement added (ocs_onnx/placement.py): its tensors (which calibration may
    # still keep float), scalar constants {name: nodes reading them quantized}, integer ops
    # {node: (the kernel onnxruntime runs it as, the activations it reads and writes)}.
    placed: tuple[str, ...] = ()
    constants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    integer_ops: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # groups of tensors that share one set of parameters, from the union of their statistics
    shared: tuple[tuple[str, ...], ...] = ()
    # {layer: (its input, channel axis)} whose per-channel maxima calibration records: the bound
    # on the 16-bit pair sums of 8-bit kernels (ocs_onnx/overflow.py), at W8A8 only.
    channel_peak_inputs: dict[str, tuple[str, int]] = field(default_factory=dict)
    # {layer: how it reads its input as rows of features} whose Gram matrix and mean calibration
    # gathers (--rounding hessian, --bias-correction; ocs_onnx/hessian.py)
    input_layouts: dict[str, InputLayout] = field(default_factory=dict)


@dataclass(frozen=True)
class ActivationStatistics:
    """What calibration observed of every tensor it watched: (min, max), a histogram of the
    values, per-channel histograms of the split candidates, and per-channel maxima of the layer
    inputs whose 8-bit pair sums are bounded."""

    ranges: dict[str, tuple[float, float]]
    histograms: dict[str, SymmetricHistogram]
    channel_histograms: dict[str, ChannelHistograms]
    # per-channel maxima of the plan's channel_peak_inputs, {tensor: one value per channel}
    channel_peaks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """Where the calibration samples came from (for the report), and the first batch with the
    float model's outputs on it (the quantized model is checked against them); None without
    calibration."""

    summary: dict
    reference: ReferenceBatch | None


@dataclass(frozen=True)
class ActivationSplit:
    """One activation split by activation OCS: the layers that read ``tensor`` read the split
    tensor ``Concat(tensor, copies) * factor (+ offset)`` instead."""

    tensor: str
    channels: list[int]
    # The Add of the quantization-aware offsets (None for --split naive), and the offsets in
    # units of the split tensor's quantization step, filled in once that step is known.
    offset: gs.Constant | None
    offset_steps: np.ndarray
    # Range and histogram of the split tensor, derived from the per-channel histograms.
    range: tuple[float, float]
    histogram: SymmetricHistogram


@dataclass(frozen=True)
class ActivationSplits:
    """What activation OCS did: {split tensor: ActivationSplit}, and for every layer that reads
    a split tensor, the weight constant it reads now (rows of the copied channels duplicated)
    and those channels."""

    splits: dict[str, ActivationSplit] = field(default_factory=dict)
    widened_weights: dict[str, gs.Constant] = field(default_factory=dict)
    copied_channels: dict[str, list[int]] = field(default_factory=dict)

    @property
    def replaced(self) -> dict[str, str]:
        """{tensor: the split tensor that replaces it}."""
        return {split.tensor: name for name, split in self.splits.items()}

    def weight_of(self, layer: Layer) -> gs.Constant:
        """The weight constant the layer reads after activation OCS."""
        return self.widened_weights.get(layer.name, layer.weight)


@dataclass(frozen=True)
class WeightSplit:
    """What weight OCS did to one layer."""

    # The weight before weight OCS (the model's, with activation OCS's rows), and the constant
    # weight OCS left the layer reading (the split weight, computed from it on every read; or
    # that weight), which quantize-weights replaces in the graph by its int8 form.
    unsplit: np.ndarray
    constant: gs.Constant
    # The channel split at each step, and the original channel of every channel after.
    splits: list[int]
    channel_origins: list[int]
    not_split_reason: str | None
    # Output channels this layer computes a second time, appended after its own, for a split
    # layer after it (the copies folded into this producer; see ocs_onnx/widening.py).
    out_copies: list[int] = field(default_factory=list)
    # For a split layer: the node whose output rows compute its input's copies (None: copied at
    # run time by a Concat of Slices).
    copies_folded_into: str | None = None

    @property
    def input_channels(self) -> int:
        return len(self.channel_origins) - len(self.splits)

    @property
    def widened(self) -> bool:
        """The layer's weight differs from the model's in shape (input splits or output copies)."""
        return bool(self.splits or self.out_copies)


@dataclass(frozen=True)
class WeightSplits:
    """{layer name: WeightSplit}, and the tensors weight OCS added to widen layer inputs (the
    Slices and Concat that copy channels), {tensor: the tensor whose channels it copies}."""

    layers: dict[str, WeightSplit]
    widened_inputs: dict[str, str]


@dataclass(frozen=True)
class WeightScale:
    """A layer's weight range, clip threshold and quantization scale (scalars, or one per output
    channel), on the split weight."""

    max_abs: np.ndarray
    clip_threshold: np.ndarray
    scale: np.ndarray
    # Scales raised above alpha / qmax so that the layer's int32 bias fits (see clip-weights).
    raised_for_bias: int = 0
    # Scales raised so that 8-bit kernels cannot overflow their 16-bit pair sums (clip-weights).
    raised_for_overflow: int = 0


@dataclass(frozen=True)
class WeightQuality:
    """Sum of the squared original weights (the report weighs layers by it) and the SQNR of the
    weight the quantized layer effectively applies, with OCS and without."""

    energy: float
    sqnr_without_ocs_db: float | None
    sqnr_with_ocs_db: float | None


def activations_to_quantize(
    plan: ActivationPlan, splits: ActivationSplits, weight_splits: WeightSplits
) -> dict[str, str]:
    """The activation tensors that get Q/DQ pairs, {tensor: tensor whose parameters it uses}, in
    the order the pairs are inserted: the plan, with every split tensor in the place (and the
    position) of the tensor it splits, then the tensors weight OCS added to widen layer inputs,
    with the parameters of the input they widen."""
    replaced = splits.replaced
    tensors = {replaced.get(n, n): replaced.get(s, s) for n, s in plan.tensors.items()}
    for tensor, copied in weight_splits.widened_inputs.items():
        if copied in tensors:
            tensors[tensor] = tensors[copied]
    return tensors


def observed(
    source: str, statistics: ActivationStatistics, splits: ActivationSplits
) -> tuple[tuple[float, float], SymmetricHistogram | None]:
    """Range and histogram of an activation whose parameters come from its own statistics:
    calibrated, or (a split tensor) derived from the per-channel histograms."""
    split = splits.splits.get(source)
    if split is not None:
        return split.range, split.histogram
    return statistics.ranges[source], statistics.histograms.get(source)


# --------------------------------------------------------------------------------------------
# The facts
# --------------------------------------------------------------------------------------------

# Markers say that a property of the graph holds; the others carry a value of the type named.
UNIQUE_NODE_NAMES = Fact("unique-node-names", Binding.NONE, "marker: every node has a unique name")
CONSTANT_WEIGHTS = Fact("constant-weights", Binding.NONE, "marker: weights in Constant nodes are initializers")
OPSET_13 = Fact("opset-13", Binding.NONE, "marker: opset 13 or newer (per-axis DequantizeLinear)")
BATCHNORMS_FOLDED = Fact("batchnorms-folded", Binding.NONE, "marker: BatchNorms after Convs are folded")
HARDSWISH_FUSED = Fact("hardswish-fused", Binding.NONE, "marker: spelled-out HardSwish is one op")
AFFINE_FOLDED = Fact("affine-folded", Binding.NONE, "marker: constant Add/Sub/Mul after Convs are folded")
TENSOR_TYPES = Fact("tensor-types", Binding.NONE, "marker: tensors carry inferred types and shapes")
LINEAR_CANONICAL = Fact("linear-canonical", Binding.NONE, "marker: 2-D MatMul + Add are Gemms, alpha/beta folded")
EQUALIZED = Fact("equalized", Binding.NAMES, "dict[str, str]: layers equalized with the layer after them")
LAYERS = Fact("layers", Binding.OBJECTS, "list[Layer]: the layers to quantize")
KEPT_FLOAT = Fact("kept-float", Binding.NAMES, "dict[str, str]: weighted nodes kept float, and why")
ACTIVATION_PLAN = Fact("activation-plan", Binding.NAMES, "ActivationPlan: activation tensors to quantize")
ACTIVATION_STATISTICS = Fact("activation-statistics", Binding.NAMES, "ActivationStatistics: calibrated ranges")
CALIBRATION = Fact("calibration", Binding.NAMES, "Calibration: calibration source and reference batch")
ACTIVATION_SPLITS = Fact("activation-splits", Binding.OBJECTS, "ActivationSplits: activation OCS splits")
WEIGHT_SPLITS = Fact("weight-splits", Binding.OBJECTS, "WeightSplits: weight OCS splits")
WEIGHT_SCALES = Fact("weight-scales", Binding.NAMES, "dict[str, WeightScale]: weight clip thresholds and scales")
QA_WEIGHT_OFFSETS = Fact("qa-weight-offsets", Binding.NONE, "marker: split weights hold quantization-aware pieces")
WEIGHT_QUALITY = Fact("weight-quality", Binding.NAMES, "dict[str, WeightQuality]: weight SQNR per layer")
QUANTIZED_WEIGHTS = Fact("quantized-weights", Binding.NONE, "marker: layers read int8 weights")
ACTIVATION_QPARAMS = Fact("activation-qparams", Binding.NAMES, "dict[str, ActivationQParams]: Q/DQ parameters")
ACTIVATION_CLIPPING = Fact("activation-clipping", Binding.NAMES, "ActivationClipping: thresholds, clipped ranges")
QA_ACTIVATION_OFFSETS = Fact("qa-activation-offsets", Binding.NONE, "marker: split activations hold their offsets")
QUANTIZED_ACTIVATIONS = Fact("quantized-activations", Binding.NONE, "marker: Q/DQ on activations, int32 biases")
VERIFICATION = Fact("verification", Binding.NONE, "dict: what onnxruntime runs, how close it is to float")
LAYER_INPUTS = Fact("layer-input-statistics", Binding.NAMES, "dict[str, InputGram]: Gram matrix and mean of layer inputs")
WEIGHT_LEVELS = Fact("weight-levels", Binding.NAMES, "dict[str, WeightLevels]: weights rounded from their inputs")
FLOAT_RUN = Fact("float-run", Binding.NONE, "FloatRun | None: the float model as calibrated, to run again")
SENSITIVITY = Fact("sensitivity", Binding.NAMES, "Sensitivity | None: output SQNR per quantized tensor, kept float")
REFINED_LEVELS = Fact("refined-levels", Binding.NAMES, "dict[str, WeightLevels]: weights rounded again on quantized inputs")


@dataclass(frozen=True)
class FloatRun:
    """The float model as calibration ran it (without its large weights, ``constants`` fed
    beside the inputs), and its calibration batches again: what a later pass needs to compare
    a layer's float inputs with the quantized model's."""

    model: bytes
    constants: dict
    specs: list
    batches: Callable[[], Iterator[dict]]
    fixed_batch: bool
    # the samples calibration left out, for the sensitivity analysis (None: none were)
    held_out: Callable[[], Iterator[dict]] | None = None
    # every batch is one sample as the model takes it (data stacking whole feeds)
    unbatched: bool = False


@dataclass(frozen=True)
class Sensitivity:
    """What analyze-sensitivity measured on the held-out samples: the output SQNR against the
    float model with each candidate alone quantized (QDQ arithmetic), of the compiled model as
    onnxruntime serves it, the target, the candidates kept float for it (indices, most sensitive
    first) and the output SQNR with them float."""

    held_out_samples: int
    candidates: tuple[Candidate, ...]
    alone_db: tuple[float, ...]
    quantized_db: float
    target_db: float | None
    kept_float: tuple[int, ...]
    final_db: float
    # the user's metric (Python API): of the float model, as quantized, final; and max_drop
    metric: dict | None = None
    # how many of the held-out samples ranked the candidates
    ranking_samples: int = 0


@dataclass(frozen=True)
class WeightLevels:
    """A layer's weight levels as round-weights chose them (the weight's shape; None: nearest
    rounding, which quantize-weights does), why not by its inputs where it was asked to be, and
    the output error on the calibration inputs against nearest rounding's (a ratio; None
    without those inputs)."""

    levels: np.ndarray | None
    rounding: str
    output_error_vs_nearest: float | None = None
    bias_corrected: bool = False


@dataclass(frozen=True)
class ActivationClipping:
    """Per observed tensor: the --aclip threshold of |x|, the range after clipping, and the SQNR
    estimated on the histogram under the final parameters."""

    thresholds: dict[str, float]
    clipped_ranges: dict[str, tuple[float, float]]
    sqnr_db: dict[str, float | None]
    # Tensors the int8 placement added that the statistics keep float, and why.
    kept_float: dict[str, str] = field(default_factory=dict)


__all__ = [
    "ActivationClipping",
    "ActivationPlan",
    "ActivationQParams",
    "ActivationSplit",
    "ActivationSplits",
    "ActivationStatistics",
    "Binding",
    "Calibration",
    "Fact",
    "Layer",
    "InputGram",
    "WeightLevels",
    "WeightQuality",
    "WeightScale",
    "WeightSplit",
    "WeightSplits",
]

"""The compile context: what passes learn about the model and hand to the passes after them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .calibration import ReferenceBatch
from .config import CompileConfig
from .quant import ActivationQParams

log = logging.getLogger("ocs_onnx")


@dataclass
class LayerPlan:
    """One Conv/Gemm/MatMul whose weight gets quantized (and maybe split)."""

    node: gs.Node
    weight: gs.Constant
    # Axes of the weight tensor: input channels (split along it) and output channels
    # (per-channel scales along it).
    weight_in_axis: int
    weight_out_axis: int
    # Axis of the layer's data input that carries the input channels (where OCS Gathers).
    input_channel_axis: int
    splittable: bool
    not_split_reason: str | None = None
    original_weight: np.ndarray | None = None
    # OCS: the channel split at each step, and the original channel of every channel after.
    splits: list[int] = field(default_factory=list)
    channel_origins: list[int] | None = None
    # Activation OCS: the input channels copied (with their weight rows, unchanged) before
    # weight OCS ran; original_weight already holds those rows.
    activation_copies: list[int] = field(default_factory=list)
    # Weight range, clip threshold and scale (scalars, or one per output channel), set on the
    # split weights by clip-weights.
    max_abs: np.ndarray | None = None
    clip_threshold: np.ndarray | None = None
    scale: np.ndarray | None = None
    # sum of the squared original weights (the report's combined SQNR weighs layers by it)
    weight_energy: float | None = None
    sqnr_without_ocs_db: float | None = None
    sqnr_with_ocs_db: float | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def input_channels(self) -> int:
        return int(self.original_weight.shape[self.weight_in_axis])

    @property
    def model_weight_size(self) -> int:
        """Size of the weight as the input model has it (before any copy of activation OCS)."""
        channels = self.input_channels
        return self.original_weight.size // channels * (channels - len(self.activation_copies))


@dataclass
class ActivationSplit:
    """One activation split by activation OCS: ``tensor`` becomes the split tensor that its
    layers read, ``Concat(tensor, copies) * factor (+ offset)``."""

    tensor: str
    channels: list[int]
    # The Add of the quantization-aware offsets (None for --split naive) and the offsets in
    # units of the split tensor's quantization step, set once that step is known.
    offset: gs.Constant | None
    offset_steps: np.ndarray


@dataclass
class CompileContext:
    config: CompileConfig
    source: str = "<model>"
    # The model as loaded (a ModelSource), to tell a model that cannot run from a compiled
    # model that cannot.
    input_model: object = None
    # A folder for temporary files (a large model's copy for onnxruntime); None: the system's.
    scratch: object = None
    # Hands the memory pages of a weight read from a mapped data file back to the kernel (see
    # MappedData.release); passes that read every weight call it after each layer.
    release: object = None
    layers: list[LayerPlan] = field(default_factory=list)
    # Nodes kept float and why: {node name: reason}.
    kept_float: dict[str, str] = field(default_factory=dict)
    # Activation tensors to quantize: {tensor name: name of the tensor whose statistics it uses}.
    # A tensor behind an OCS Gather shares the parameters of the tensor before it.
    activations: dict[str, str] = field(default_factory=dict)
    # Tensors made by weight-ocs to duplicate input channels (the Gather of the split channels
    # and the Concat that appends them): {tensor name: the tensor whose channels they copy}.
    ocs_duplicates: dict[str, str] = field(default_factory=dict)
    # Activation OCS: tensors that may be split, {name: (channel axis, channels)}, their
    # per-channel calibration histograms, and the splits made, {split tensor: ActivationSplit}.
    activation_split_candidates: dict[str, tuple[int, int]] = field(default_factory=dict)
    activation_channel_histograms: dict = field(default_factory=dict)
    activation_splits: dict[str, "ActivationSplit"] = field(default_factory=dict)
    # Calibration: {observed tensor name: (min, max)}, and where the samples came from.
    activation_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    activation_histograms: dict = field(default_factory=dict)
    # Ranges after --aclip: {observed tensor name: (lo, hi)}.
    activation_clipped_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    activation_qparams: dict[str, ActivationQParams] = field(default_factory=dict)
    # --aclip thresholds of |x| and SQNR estimated on the histogram: {observed tensor name: value}.
    activation_clip_thresholds: dict[str, float] = field(default_factory=dict)
    activation_sqnr_db: dict[str, float | None] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    # First calibration batch and the float model's outputs on it (checked after quantization).
    reference_batch: ReferenceBatch | None = None
    normalization: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    pass_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _used_names: set[str] = field(default_factory=set)

    def done_with(self, array) -> None:
        """The pass has read ``array`` (a weight) for now."""
        if self.release is not None:
            self.release(array)

    def warn(self, message: str) -> None:
        """A warning for the user: logged now and listed in the report."""
        self.warnings.append(message)
        log.warning(message)

    def reserve_names(self, graph: gs.Graph) -> None:
        self._used_names = {t for t in graph.tensors()} | {n.name for n in graph.nodes if n.name}

    def unique_name(self, base: str) -> str:
        """A tensor/node name not used anywhere in the graph yet (deterministic)."""
        name, k = base, 1
        while name in self._used_names:
            name = f"{base}_{k}"
            k += 1
        self._used_names.add(name)
        return name

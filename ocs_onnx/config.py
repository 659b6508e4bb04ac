"""Compile options, validated once, in one place, for the CLI and the Python API alike."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from .clip import CLIP_METHODS
from .errors import UsageError
from .quant import MAX_BITS, MIN_BITS
from .readers import describe, is_data_object

SPLIT_MODES = ("qa", "naive")
GRANULARITIES = ("channel", "tensor")
ACTIVATION_TYPES = ("uint8", "int8")
# How weights are rounded to their grid: to the nearest level, or by GPTQ on each layer's
# calibration inputs (ocs_onnx/hessian.py).
ROUNDINGS = ("auto", "nearest", "hessian")
# Whose inputs Hessian rounding reads: the float model's only, or then also the quantized
# model's (each layer re-rounded on the inputs it will really get, kept where that brings its
# output closer to the float layer's). "float" by default: the quantized inputs gained 3 points
# on PP-OCRv5 rec at W4A8 and lost 1-10 on cls at W3/W4, for 1.7x the compile time (README,
# "Hessian rounding and bias correction").
ROUNDING_INPUTS = ("float", "quantized")


# --min-split-gain auto: the gain a split must bring at 6 weight bits and more.
AUTO_SPLIT_GAIN_DB = 1.0


@dataclass(frozen=True)
class CompileConfig:
    """What to compile and how. Defaults are the recommended settings (see README)."""

    wbits: int = 8
    # Activation bits; None means weight-only quantization with no calibration (data-free).
    abits: int | None = 8
    # OCS expansion ratio r: ceil(r * C_in) extra input channels per splittable layer.
    ratio: float = 0.02
    # Activation OCS ratio: ceil(r * C) channels of a layer's input split, chosen by calibration.
    act_ratio: float = 0.0
    split: str = "qa"
    # Cross-layer equalization before anything else (passes/equalize.py): pairs of layers joined
    # through Relu, LeakyRelu or nothing get balanced weight ranges, the same function.
    equalize: bool = False
    # Keep a layer's splits only when they lower its weight quantization error.
    ocs_guard: bool = True
    # ... and only when they raise its estimated output SQNR (its weight's quantization noise and
    # its input's, together) by at least this many dB: every split costs
    # run time (wider layers at unaligned channel counts, or copies at run time). None =
    # automatic: 1 dB for weights of 6 bits and more, where OCS moves no task metric measurably
    # and the splits it makes cost 10-90 % of latency; 0 below, where its gains are real (README,
    # "Defaults, and why").
    min_split_gain_db: float | None = None
    # The copies of a split layer's input channels are computed by the layer that produces the
    # input, with duplicated output rows (ocs_onnx/widening.py), where it can: no copy at run
    # time. False: always a Concat of Slices at run time.
    fold_ocs_copies: bool = True
    granularity: str = "channel"
    # Weight rounding (ROUNDINGS), and bias correction: the bias absorbs the mean output shift
    # the rounding caused on the calibration data. Both read each layer's calibration inputs.
    # "auto": Hessian rounding below 8 weight bits when --calib-data is given (where it keeps
    # up to 80 points more of the task metric, README "Hessian rounding"), nearest otherwise
    # (at 8 bits it gains little and would take 2-3x the compile time).
    rounding: str = "auto"
    rounding_inputs: str = "float"
    bias_correction: bool = False
    # Quantize, beyond the layers, the ops onnxruntime runs as integer kernels (residual Adds,
    # SE Muls, pooling, Concat, Sigmoid, and the data movement between them: ocs_onnx/placement.py).
    # Only with 8-bit activations: below, onnxruntime has no kernels for them.
    int8_ops: bool = True
    # A tensor the int8 placement added stays float when its estimated quantization SQNR is
    # more than this many dB below the median of the layers' activations. None: never.
    int8_error_margin_db: float | None = 12.0
    # uint8 with a zero point (asymmetric) or int8 with zero point 0 (symmetric).
    activation_type: str = "uint8"
    # Clip-threshold methods for weights and activations (see ocs_onnx/clip.py).
    wclip: str = "none"
    # Activations clip at the 99.99th percentile of |x| by default: with the plain calibrated
    # range, one value in ten thousand sets the step for all the others (README, defaults).
    aclip: str = "percentile"
    percentile: float = 99.99
    # A path (an .npz, or a folder of .npz/.npy files), or through the API an onnxruntime
    # CalibrationDataReader, an iterable of {input: array} batches, or a callable returning
    # one batch per call (ocs_onnx/readers.py).
    calib_data: Path | object | None = None
    calib_samples: int = 128
    calib_batch: int = 16
    # Glob patterns on node names or op types; matching nodes stay float.
    exclude: tuple[str, ...] = ()
    seed: int = 0
    # onnxruntime's uint8 x int8 kernels add pairs of products in 16 bits on x86 CPUs without
    # VNNI (AVX2), which a full +-127 weight grid can overflow (ocs_onnx/overflow.py). None =
    # automatic: at W8A8 each weight row gets the finest scale whose pair sums provably fit on
    # the calibration data. True: every 8-bit weight on the 7-bit grid +-63 (always fits).
    # False: the full grid everywhere (CPUs with VNNI, or other runtimes).
    reduce_range: bool | None = None
    # Measure what each quantized weight and activation group costs the outputs (output SQNR
    # against the float model, each alone) on samples calibration leaves out: the last
    # ``holdout_samples`` of --calib-data. With ``target_sqnr_db``, the fewest of them, most
    # sensitive first, stay float so that the compiled model's output SQNR on those samples
    # reaches the target (exit 7 and nothing written when only a model with every activation,
    # or half the weights, float would).
    sensitivity: bool = False
    target_sqnr_db: float | None = None
    holdout_samples: int = 16
    # Through the Python API: a task metric, ``metric(model path) -> float`` (higher is better),
    # and the largest drop from the float model's value to accept. The fewest candidates, most
    # sensitive first, stay float so that it holds (with ``target_sqnr_db`` as well, if set).
    metric: Callable[[str], float] | None = field(default=None, compare=False)
    max_drop: float | None = None
    # Verify the output in onnxruntime (load, count integer kernels, run one batch).
    verify: bool = True
    # The verification fails (exit 6, nothing written) when the outputs of onnxruntime's integer
    # kernels are further than this (output SQNR, dB) from the QDQ arithmetic the model
    # specifies: a kernel computed something else. None: only warn.
    min_kernel_agreement_db: float | None = 15.0
    # Write the output's weights to a data file beside it (ONNX external data). Without it,
    # only a model that would reach protobuf's 2 GiB limit is written so.
    external_data: bool = False
    # Stop the pipeline after this pass (for debugging and for equivalence tests).
    stop_after: str | None = None
    dump_after: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        _check_bits("--wbits", self.wbits)
        if self.abits is not None:
            _check_bits("--abits", self.abits)
        for flag, value in (("--ratio", self.ratio), ("--act-ratio", self.act_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise UsageError(f"{flag} must be a number between 0 and 1, got {value!r}")
        if self.act_ratio > 0 and self.abits is None:
            raise UsageError("--act-ratio splits activations, which --abits none leaves float: drop one of the two")
        _check_choice("--split", self.split, SPLIT_MODES)
        _check_choice("--granularity", self.granularity, GRANULARITIES)
        _check_choice("--activation-type", self.activation_type, ACTIVATION_TYPES)
        _check_choice("--rounding", self.rounding, ROUNDINGS)
        _check_choice("--rounding-inputs", self.rounding_inputs, ROUNDING_INPUTS)
        _check_choice("--wclip", self.wclip, CLIP_METHODS)
        _check_choice("--aclip", self.aclip, CLIP_METHODS)
        if (
            isinstance(self.percentile, bool)
            or not isinstance(self.percentile, (int, float))
            or not 0 < self.percentile <= 100
        ):
            raise UsageError(f"--percentile must be a number in (0, 100], got {self.percentile!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, got {self.seed!r}")
        for name in ("calib_samples", "calib_batch", "holdout_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        gain = self.min_split_gain_db
        if gain is not None and (isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain >= 0):
            raise UsageError(f"--min-split-gain must be a non-negative number of dB or 'auto', got {gain!r}")
        for flag, value in (("--min-kernel-agreement", self.min_kernel_agreement_db),
                            ("--int8-error-margin", self.int8_error_margin_db)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
                raise UsageError(f"{flag} must be a number of dB or 'none', got {value!r}")
        target = self.target_sqnr_db
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target)
        ):
            raise UsageError(f"--target-sqnr must be a number of dB, got {target!r}")
        if (self.metric is None) != (self.max_drop is None):
            raise UsageError("metric and max_drop go together: the metric to hold, and how far it may drop")
        if self.metric is not None and not callable(self.metric):
            raise UsageError(f"metric must be a callable taking a model path, got {self.metric!r}")
        drop = self.max_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not drop >= 0):
            raise UsageError(f"max_drop must be a non-negative number, got {drop!r}")
        if self.analyzes_sensitivity and self.calib_data is None:
            flag = "--target-sqnr" if target is not None else ("metric" if self.metric else "--sensitivity")
            raise UsageError(f"{flag} needs --calib-data: it measures the model on real samples calibration leaves out")
        if self.calib_data is not None and not is_data_object(self.calib_data):
            object.__setattr__(self, "calib_data", Path(self.calib_data))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "dump_after", tuple(self.dump_after))

    @property
    def rounding_method(self) -> str:
        """The rounding in force: ``rounding`` with "auto" resolved."""
        if self.rounding != "auto":
            return self.rounding
        return "hessian" if self.wbits < 8 and self.calib_data is not None else "nearest"

    @property
    def analyzes_sensitivity(self) -> bool:
        """The sensitivity analysis runs (``sensitivity``, or a target to meet)."""
        return bool(self.sensitivity) or self.seeks_accuracy

    @property
    def seeks_accuracy(self) -> bool:
        """A target to meet: ``target_sqnr_db``, or a metric and its ``max_drop``."""
        return self.target_sqnr_db is not None or self.metric is not None

    @property
    def reads_layer_inputs(self) -> bool:
        """Calibration gathers each layer's input statistics (Hessians, means)."""
        return self.rounding_method == "hessian" or self.bias_correction

    @property
    def split_gain_db(self) -> float:
        """The --min-split-gain in force (see ``min_split_gain_db``)."""
        if self.min_split_gain_db is not None:
            return float(self.min_split_gain_db)
        return AUTO_SPLIT_GAIN_DB if self.wbits >= 6 else 0.0

    @property
    def weight_bits(self) -> int:
        """The bit width of the weight grid actually used (7 for 8-bit weights in reduced range)."""
        return 7 if self.wbits == 8 and self.reduces_range else self.wbits

    @property
    def reduces_range(self) -> bool:
        """Every 8-bit weight on the +-63 grid (``--reduce-range``)."""
        return bool(self.reduce_range) and self.wbits == 8

    @property
    def refines_rounding(self) -> bool:
        """Hessian-rounded layers are rounded again on the quantized model's inputs."""
        return self.rounding_method == "hessian" and self.rounding_inputs == "quantized" and not self.bias_correction

    @property
    def bounds_pair_sums(self) -> bool:
        """Weight scales raised per row where the 16-bit pair sums could overflow (the default at
        W8A8; below 8 bits on either side nothing can: 2 x 255 x 63 and 2 x 127 x 127 fit)."""
        return self.reduce_range is None and self.wbits == 8 and self.abits == 8

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # asdict would deep-copy a reader
        data = self.calib_data
        d["calib_data"] = None if data is None else (describe(data) if is_data_object(data) else str(data))
        d["exclude"] = list(self.exclude)
        d["dump_after"] = list(self.dump_after)
        d["reduce_range"] = "auto" if self.bounds_pair_sums else self.reduces_range
        d["rounding"] = self.rounding_method
        d["metric"] = getattr(self.metric, "__qualname__", repr(self.metric)) if self.metric is not None else None
        return d


def _check_bits(flag: str, bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"{flag} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")

"""The rewriting passes of ocs-onnx, one file each, in pipeline order."""

from . import (
    activations,
    batchnorm,
    calibrate,
    constants,
    linear,
    names,
    opset,
    qa_split,
    quantize_activations,
    quantize_weights,
    select,
    shapes,
    verify,
    weight_ocs,
    weight_scales,
)

DEFAULT_PASSES = [
    names.PASS,
    constants.PASS,
    opset.PASS,
    batchnorm.PASS,
    shapes.PASS,
    linear.PASS,
    select.PASS,
    weight_ocs.PASS,
    activations.PASS,
    calibrate.PASS,
    weight_scales.PASS,
    qa_split.PASS,
    quantize_weights.PASS,
    quantize_activations.PASS,
    verify.PASS,
]

"""The rewriting passes of ocs-onnx, one file each, in pipeline order."""

from . import (
    activations,
    batchnorm,
    calibrate,
    clip_activations,
    clip_weights,
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
    clip_weights.PASS,
    qa_split.PASS,
    quantize_weights.PASS,
    clip_activations.PASS,
    quantize_activations.PASS,
    verify.PASS,
]

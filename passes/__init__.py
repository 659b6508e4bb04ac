"""The passes of ocs-onnx, one file each (activation OCS and its offsets share one), and the
default pipeline. Installed as ``ocs_onnx.passes``."""

from . import (
    activation_ocs,
    affine,
    activations,
    batchnorm,
    calibrate,
    hardswish,
    clip_activations,
    clip_weights,
    constants,
    equalize,
    linear,
    names,
    opset,
    qa_split,
    quantize_activations,
    quantize_weights,
    round_weights,
    select,
    sensitivity,
    shapes,
    verify,
    weight_ocs,
)

DEFAULT_PASSES = [
    # first: onnx's version converter adds nodes (unnamed, and Constant nodes) that the two
    # passes after it then name and lift
    opset.upgrade_opset,
    names.name_nodes,
    constants.constants_to_initializers,
    batchnorm.fold_batchnorm,
    hardswish.fuse_hardswish,
    shapes.infer_shapes,
    # after shape inference: a constant that broadcasts a Conv's input to its channels does not fold
    affine.fold_affine,
    linear.canonicalize_linear,
    equalize.equalize_layers,
    select.select_layers,
    activations.plan_activations,
    calibrate.calibrate,
    activation_ocs.activation_ocs,
    weight_ocs.weight_ocs,
    clip_activations.clip_activations,
    clip_weights.clip_weights,
    qa_split.qa_split,
    round_weights.round_weights,
    quantize_weights.quantize_weights,
    activation_ocs.activation_qa_split,
    quantize_activations.quantize_activations,
    # the quantized model's own layer inputs exist from here on
    round_weights.refine_rounding,
    # the compiled graph is complete: what each of its quantized tensors costs, and what the
    # accuracy target keeps float
    sensitivity.analyze_sensitivity,
    sensitivity.keep_sensitive_float,
    verify.verify_onnxruntime,
]

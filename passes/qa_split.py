"""qa-split: turns the naive halves of every split channel into the quantization-aware split
of the paper's eq. 6, using the final scale s:  v -> ((v - s/2)/2, (v + s/2)/2).

The two pieces still add up to v (the layer computes the same function), and their quantized
values add up to Q(v) exactly, where the naive halves can both round the same way.
``--split naive`` leaves the halves as they are.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import LAYERS, QA_WEIGHT_OFFSETS, WEIGHT_SCALES, WEIGHT_SPLITS
from ocs_onnx.pass_manager import GraphEffect, compiler_pass
from ocs_onnx.weights import scale_axis, split_values


@compiler_pass("qa-split", requires=(LAYERS, WEIGHT_SPLITS, WEIGHT_SCALES), produces=(QA_WEIGHT_OFFSETS,),
               effect=GraphEffect.EDITS)
def qa_split(graph: gs.Graph, ctx: CompileContext) -> None:
    """Quantization-aware pieces `((w - s/2)/2, (w + s/2)/2)` with the final scale `s`, whose
    levels add up to `Q(w)` exactly (`--split qa`)."""
    ctx.facts[QA_WEIGHT_OFFSETS] = True
    if ctx.config.split != "qa":
        return
    splits, scales = ctx.facts[WEIGHT_SPLITS].layers, ctx.facts[WEIGHT_SCALES]
    for layer in ctx.facts[LAYERS]:
        split = splits[layer.name]
        if not split.splits:
            continue
        axis = scale_axis(layer, ctx.config.granularity)
        scale = scales[layer.name].scale
        if axis is not None:  # the pieces are cut on the layer's own rows, before its copied ones
            scale = scale[: len(scale) - len(split.out_copies)]
        copies = (layer.weight_out_axis, split.out_copies) if split.out_copies else None
        split.constant.values = split_values(
            split.unsplit, layer.weight_in_axis, split.splits, qa_scale=scale, out_axis=axis, out_copies=copies
        )

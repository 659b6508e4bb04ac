"""clip-weights: the clip threshold and quantization scale of every selected layer's weight,
found on the weights as they are after splitting (OCS + clip, paper sec. 5.2-5.3): OCS has
already shrunk the range, the clip method then trades the remaining outliers against rounding.

alpha = the ``--wclip`` threshold (max|w| for ``none``), per tensor or per output channel
(``--granularity``); scale = alpha / (2^(k-1) - 1).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext
from ocs_onnx.facts import LAYERS, WEIGHT_SCALES, WEIGHT_SPLITS, WeightScale
from ocs_onnx.pass_manager import compiler_pass
from ocs_onnx.quant import max_abs, symmetric_scale
from ocs_onnx.weights import clip_thresholds, scale_axis


@compiler_pass("clip-weights", requires=(LAYERS, WEIGHT_SPLITS), produces=(WEIGHT_SCALES,))
def clip_weights(graph: gs.Graph, ctx: CompileContext) -> None:
    """Clip threshold alpha (`--wclip`; max abs for `none`) on the split weights, `scale = alpha
    / (2^(k-1)-1)`, per tensor or per output channel."""
    splits = ctx.facts[WEIGHT_SPLITS].layers
    scales = {}
    for layer in ctx.facts[LAYERS]:
        axis = scale_axis(layer, ctx.config.granularity)
        split = splits[layer.name]
        w = split.constant.values  # computed from the unsplit weight for a split layer: read once
        threshold = clip_thresholds(w, axis, ctx.config)
        scales[layer.name] = WeightScale(max_abs(w, axis), threshold, symmetric_scale(threshold, ctx.config.weight_bits))
        ctx.done_with(split.unsplit)
    ctx.facts[WEIGHT_SCALES] = scales

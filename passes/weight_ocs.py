"""weight-ocs: Outlier Channel Splitting of weights (paper sec. 3.2-3.4).

For each splittable layer with C input channels, ceil(ratio * C) times: take the input channel
that holds the largest |w|, halve it and append the other half as a new input channel. The
layer's input goes through a Gather that duplicates the same channels, so the layer computes

    y = sum_i x_i * W_i  =  ... + x_c * W_c/2 + x_c * W_c/2

This pass writes the *naive* halves; the quantization-aware offsets (paper eq. 6) need the final
scale and are applied by ``qa-split`` once ``weight-scales`` has chosen it. Layers that read the
same tensor and duplicate the same channels share one Gather.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext, LayerPlan
from ocs_onnx.pass_manager import Pass
from ocs_onnx.quant import apply_channel_splits, channel_origins, plan_channel_splits, split_count


def _gathered_shape(x: gs.Variable, axis: int, channels: int):
    if x.shape is None:
        return None
    shape = list(x.shape)
    shape[axis] = channels
    return shape


def _split_layer(plan: LayerPlan, ratio: float, ctx: CompileContext, gathers: dict) -> None:
    w = plan.original_weight
    channels = w.shape[plan.weight_in_axis]
    plan.splits = plan_channel_splits(w, plan.weight_in_axis, split_count(ratio, channels))
    plan.channel_origins = channel_origins(channels, plan.splits)
    if not plan.splits:
        return
    node = plan.node
    split_weight = gs.Constant(ctx.unique_name(f"{plan.weight.name}_ocs"), apply_channel_splits(w, plan.weight_in_axis, plan.splits))
    node.inputs[1] = split_weight
    plan.weight = split_weight

    x = node.inputs[0]
    key = (x.name, plan.input_channel_axis, tuple(plan.channel_origins))
    if key not in gathers:
        indices = gs.Constant(ctx.unique_name(f"{x.name}_ocs_indices"), np.asarray(plan.channel_origins, dtype=np.int64))
        out = gs.Variable(ctx.unique_name(f"{x.name}_ocs"), dtype=x.dtype, shape=_gathered_shape(x, plan.input_channel_axis, len(plan.channel_origins)))
        gather = gs.Node("Gather", ctx.unique_name(f"{node.name}_ocs_gather"), attrs={"axis": plan.input_channel_axis}, inputs=[x, indices], outputs=[out])
        ctx.ocs_gathers[out.name] = x.name
        gathers[key] = (gather, out)
    gather, out = gathers[key]
    node.inputs[0] = out


def run(graph: gs.Graph, ctx: CompileContext) -> None:
    gathers: dict = {}
    for plan in ctx.layers:
        if plan.splittable and ctx.config.ratio > 0:
            _split_layer(plan, ctx.config.ratio, ctx, gathers)
    graph.nodes.extend(gather for gather, _ in gathers.values())


PASS = Pass("weight-ocs", "split the input channels holding the largest |w| (duplicated weight rows + input Gather)", run)

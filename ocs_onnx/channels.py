"""Graph pieces shared by weight and activation OCS: appending copies of some channels of a
tensor along its channel axis.

The widened tensor is ``Concat(x, Slice(x, c1), Slice(x, c2), ...)`` rather than one Gather of
every channel: on the last axis (MatMul, Gemm) onnxruntime's Gather copies value by value, and a
full Gather made a quantized 256-wide MatMul 1.6x slower, where a Concat (QLinearConcat once
quantized) of small copies cost about 2 %. Slices rather than one Gather of the copied channels
because onnxruntime's layout optimizer moves Slice and Concat into NHWC with QLinearConv, where a
Gather leaves a Transpose pair around every split Conv.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ocs_onnx.context import CompileContext


def shape_with(x: gs.Variable, axis: int, channels) -> list | None:
    """x's shape with the channel axis resized (None where unknown)."""
    if x.shape is None:
        return None
    shape = list(x.shape)
    shape[axis] = channels if isinstance(channels, int) else None
    return shape


def append_channel_copies(
    ctx: CompileContext, base: str, x: gs.Variable, axis: int, copies: list[int]
) -> tuple[list[gs.Node], list[gs.Variable], gs.Variable]:
    """Nodes computing Concat(x, x[c1], x[c2], ...) along ``axis`` (one Slice per copied channel,
    reused when a channel is copied twice); returns the nodes, the Slice outputs and the Concat's."""
    known = x.shape[axis] if x.shape is not None else None
    widened_channels = known + len(copies) if isinstance(known, int) else None
    axes = gs.Constant(ctx.unique_name(f"{base}_axes"), np.asarray([axis], dtype=np.int64))
    nodes, slices = [], {}
    for channel in dict.fromkeys(copies):  # distinct, in order of first use
        out = gs.Variable(ctx.unique_name(f"{x.name}_channel{channel}"), dtype=x.dtype, shape=shape_with(x, axis, 1))
        bounds = [
            gs.Constant(ctx.unique_name(f"{out.name}_{edge}"), np.asarray([value], dtype=np.int64))
            for edge, value in (("start", channel), ("end", channel + 1))
        ]
        nodes.append(
            gs.Node("Slice", ctx.unique_name(f"{base}_slice{channel}"), inputs=[x, *bounds, axes], outputs=[out])
        )
        slices[channel] = out
    widened = gs.Variable(ctx.unique_name(f"{x.name}_ocs"), dtype=x.dtype, shape=shape_with(x, axis, widened_channels))
    nodes.append(
        gs.Node(
            "Concat",
            ctx.unique_name(f"{base}_concat"),
            attrs={"axis": axis},
            inputs=[x] + [slices[c] for c in copies],
            outputs=[widened],
        )
    )
    return nodes, list(slices.values()), widened

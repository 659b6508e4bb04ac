"""Graph pieces shared by weight and activation OCS: appending copies of some channels of a
tensor along its channel axis.

The widened tensor is ``Concat(x, Slice(x, c1), Slice(x, c2), ...)`` (one Slice per run of
consecutive channels) rather than one Gather of
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


def copy_runs(copies: list[int]) -> list[tuple[int, int]]:
    """``copies`` as runs of consecutive channels, in order: [3, 4, 5, 1] -> [(3, 6), (1, 2)]."""
    runs: list[tuple[int, int]] = []
    for channel in copies:
        if runs and runs[-1][1] == channel:
            runs[-1] = (runs[-1][0], channel + 1)
        else:
            runs.append((channel, channel + 1))
    return runs


def append_channel_copies(
    ctx: CompileContext, base: str, x: gs.Variable, axis: int, copies: list[int]
) -> tuple[list[gs.Node], list[gs.Variable], gs.Variable]:
    """Nodes computing Concat(x, x[c1], x[c2], ...) along ``axis``: one Slice per run of
    consecutive copied channels (reused when a run is copied twice), none for a run that is the
    whole of x (a 1-channel input copied: ``Concat(x, x)``), since on small tensors every node
    costs more than the copying it does. Returns the nodes, the Slice outputs and the Concat's."""
    known = x.shape[axis] if x.shape is not None else None
    widened_channels = known + len(copies) if isinstance(known, int) else None
    axes = gs.Constant(ctx.unique_name(f"{base}_axes"), np.asarray([axis], dtype=np.int64))
    nodes, slices = [], {}
    pieces = []
    for run in copy_runs(copies):
        start, end = run
        if start == 0 and end == known:
            pieces.append(x)
            continue
        if run not in slices:
            name = f"channel{start}" if end == start + 1 else f"channels{start}to{end - 1}"
            out = gs.Variable(
                ctx.unique_name(f"{x.name}_{name}"), dtype=x.dtype, shape=shape_with(x, axis, end - start)
            )
            bounds = [
                gs.Constant(ctx.unique_name(f"{out.name}_{edge}"), np.asarray([value], dtype=np.int64))
                for edge, value in (("start", start), ("end", end))
            ]
            suffix = f"slice{start}" if end == start + 1 else f"slice{start}to{end - 1}"
            nodes.append(
                gs.Node("Slice", ctx.unique_name(f"{base}_{suffix}"), inputs=[x, *bounds, axes], outputs=[out])
            )
            slices[run] = out
        pieces.append(slices[run])
    widened = gs.Variable(ctx.unique_name(f"{x.name}_ocs"), dtype=x.dtype, shape=shape_with(x, axis, widened_channels))
    nodes.append(
        gs.Node(
            "Concat", ctx.unique_name(f"{base}_concat"), attrs={"axis": axis}, inputs=[x, *pieces], outputs=[widened]
        )
    )
    return nodes, list(slices.values()), widened

"""verify-onnxruntime: the output must load in onnxruntime, fuse into integer kernels, and run.

onnxruntime (CPU provider, default optimization level) optimizes the QDQ model; the graph it
will actually run is written with ``SessionOptions.optimized_model_filepath`` and the integer
kernels in it are counted. The first calibration batch then runs through the quantized model
and its outputs are compared with the float model's (SQNR in dB).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ocs_onnx import owned
from ocs_onnx.calibration import integer_input_limits, model_input_specs, prepare_feed, synthetic_batches
from ocs_onnx.context import CompileContext
from ocs_onnx.errors import InvalidModelError, VerificationError, first_line
from ocs_onnx.facts import CALIBRATION, LAYERS, QUANTIZED_ACTIVATIONS, QUANTIZED_WEIGHTS, VERIFICATION
from ocs_onnx.gs_adapter import constant_array, graph_skeleton
from ocs_onnx.pass_manager import compiler_pass
from ocs_onnx.quant import sqnr_db
from ocs_onnx.sessions import NO_OPTIMIZATION, input_session, new_session, onnxruntime_message, session_model

# onnxruntime's integer kernels for Conv/Gemm/MatMul (CPU provider, any layout domain).
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "QAttention",
    }
)


# Integer kernels and the QDQ float simulation differ by requantization rounding, which in most
# models stays far above this; below it either a kernel overflowed or the model amplifies
# rounding differences through many layers (deep OCR models do).
KERNEL_AGREEMENT_WARN_DB = 25.0


def kernel_disagreement_hint(weight_bits: int, abits: int | None, pair_sums_bounded: bool = False) -> str:
    """Why integer kernels may disagree with the QDQ arithmetic at these bit widths. uint8 x int8
    kernels without VNNI add pairs of products in 16 bits: 2 x 255 x 127 overflows, but with
    weights of at most 7 bits (|q| <= 63) or activations below 8 bits it cannot, and where the
    weight scales were raised per row (``pair_sums_bounded``) it cannot on the calibration data."""
    if abits is None:
        return (
            "with --abits none the integer kernels come from QuantizeLinear/DequantizeLinear nodes the input model "
            "already had; check them (a float bias on a quantized Conv is ignored when onnxruntime fuses it)"
        )
    if weight_bits >= 8 and abits >= 8 and pair_sums_bounded:
        return (
            "the weight scales keep 16-bit pair sums from overflowing on the calibration data, so either inputs go "
            "beyond their calibrated range or the model amplifies the kernels' rounding differences (integer "
            "Add/Mul/pooling kernels round differently); judge it by its task metric, or try --reduce-range"
        )
    if weight_bits >= 8 and abits >= 8:
        return "likely 16-bit overflow in uint8 x int8 kernels on this CPU; try --reduce-range or lower --wbits/--abits"
    return (
        "16-bit overflow is ruled out at these bit widths, so the model amplifies the kernels' rounding "
        "differences; judge it by its task metric, or try --aclip or --exclude for sensitive layers"
    )


def optimized_op_counts(model: bytes | str) -> tuple[ort.InferenceSession, Counter]:
    """A session on the model (its bytes or its path) and the op types of the graph onnxruntime
    optimized it into."""
    with owned.temporary_folder() as tmp:
        optimized_path = str(Path(tmp) / "optimized.onnx")
        config = {
            # only the op types are read: the weights go to a file that is never loaded
            "session.optimized_model_external_initializers_file_name": "weights.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
            # Pre-packed weights would be one more copy of them; the kernels chosen and their
            # (integer) results are the same without.
            "session.disable_prepacking": "1",
        }
        optimized_session = new_session(model, config=config, optimized_model_path=optimized_path)
        optimized = onnx.load(optimized_path, load_external_data=False)
    return optimized_session, Counter(node.op_type for node in optimized.graph.node)


# A compiled model with more weight bytes than this is verified from a copy written with
# external data, which onnxruntime maps rather than copies.
INLINE_SESSION_BYTES = 64 << 20


@compiler_pass("verify-onnxruntime", requires=(LAYERS, CALIBRATION, QUANTIZED_WEIGHTS, QUANTIZED_ACTIVATIONS),
               produces=(VERIFICATION,))
def verify_onnxruntime(graph: gs.Graph, ctx: CompileContext) -> None:
    """Load in onnxruntime, count integer kernels, run the first calibration batch, compare with
    the float model."""
    if not ctx.config.verify:
        ctx.facts[VERIFICATION] = {}
        return
    with session_model(graph, ctx.scratch, INLINE_SESSION_BYTES) as model:
        _verify(graph, ctx, model)


def _verify(graph: gs.Graph, ctx: CompileContext, model: bytes | str) -> None:
    try:
        session, ops = optimized_op_counts(model)
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load the compiled model: {first_line(exc)}")
    quantized = len(ctx.facts[LAYERS]) if ctx.config.abits is not None else 0
    integer = sum(count for op, count in ops.items() if op in INTEGER_KERNELS)
    result = {
        "quantized_layers": quantized,
        "integer_kernels": integer,
        "float_conv_gemm_matmul_left": sum(
            ops.get(op, 0) for op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm")
        ),
        "onnxruntime_version": ort.__version__,
    }
    skeleton, left_out = graph_skeleton(graph)
    specs = [s for s in model_input_specs(skeleton) if s.name not in left_out]
    reference = ctx.facts[CALIBRATION].reference
    if reference is not None:
        feed = reference.feed
    else:
        batch = next((s.batch_dim for s in specs if s.batch_dim is not None), 1)
        feed = next(synthetic_batches(specs, batch, batch, ctx.config.seed, integer_input_limits(graph)))
    feed = prepare_feed(feed, specs, "verification batch")
    try:
        outputs = session.run(None, feed)
    except Exception as exc:
        # Calibration ran the float model on the reference batch; without one (--abits none),
        # the input model may be what cannot run.
        if reference is None and not _input_model_runs(ctx, feed):
            raise InvalidModelError(
                f"onnxruntime cannot run the model on a synthetic batch (the input model fails as the compiled one "
                f"does): {onnxruntime_message(exc)}; --no-verify compiles it without running it"
            )
        raise VerificationError(f"onnxruntime cannot run the compiled model: {onnxruntime_message(exc)}")
    names = [o.name for o in session.get_outputs()]
    del session  # before the second session: a large model's sessions each hold its weights
    if not all(np.isfinite(o).all() for o in outputs if np.asarray(o).dtype.kind == "f"):
        ctx.warn("the compiled model produced NaN or Inf on the verification batch")
    if reference is not None:
        result["output_sqnr_db"] = {
            n: _output_sqnr_db(n, reference.outputs[n], o) for n, o in zip(names, outputs) if n in reference.outputs
        }
    if integer:
        # The same QDQ model without graph optimizations runs DequantizeLinear + float ops: the
        # exact arithmetic the model specifies. The integer kernels must agree with it; a large
        # gap means a kernel overflowed (e.g. 16-bit pair sums of uint8 x int8 on AVX2).
        simulated = _unoptimized_session(model).run(None, feed)
        agreement = {n: _output_sqnr_db(n, s, o) for n, s, o in zip(names, simulated, outputs)}
        result["integer_kernels_vs_qdq_sqnr_db"] = agreement
        worst = min((v for v in agreement.values() if v is not None), default=None)
        limit = ctx.config.min_kernel_agreement_db
        if worst is not None and limit is not None and worst < limit:
            raise VerificationError(
                f"onnxruntime's integer kernels compute something else than the QDQ model specifies (output SQNR "
                f"{worst:.1f} dB between them, below --min-kernel-agreement {limit:g}), so nothing was written: "
                + kernel_disagreement_hint(ctx.config.weight_bits, ctx.config.abits, ctx.config.bounds_pair_sums)
                + " (--min-kernel-agreement none writes the model anyway)"
            )
        if worst is not None and worst < KERNEL_AGREEMENT_WARN_DB:
            ctx.warn(
                f"onnxruntime's integer kernels deviate from the QDQ arithmetic (output SQNR {worst:.1f} dB between them): "
                + kernel_disagreement_hint(ctx.config.weight_bits, ctx.config.abits, ctx.config.bounds_pair_sums)
            )
    ctx.facts[VERIFICATION] = result


def _output_sqnr_db(name: str, expected: np.ndarray, actual: np.ndarray) -> float | None:
    """SQNR of a numeric output; an output of strings (or other objects) is not quantized and
    must come out equal (None, as for an exact numeric output)."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.dtype.kind in "biufc":
        return sqnr_db(expected, actual)
    if expected.shape != actual.shape or not (expected == actual).all():
        raise VerificationError(f"output {name!r} ({expected.dtype} values, not quantized) differs from the input model's")
    return None


def _input_model_runs(ctx: CompileContext, feed: dict[str, np.ndarray]) -> bool:
    if ctx.input_model is None:
        return True
    try:
        session, left_out = input_session(ctx.input_model)
        session.run(None, {**feed, **{name: constant_array(c) for name, c in left_out.items()}})
    except Exception:
        return False
    return True


def _unoptimized_session(model: bytes | str) -> ort.InferenceSession:
    # (no weight of this graph is pre-packed: its layers read DequantizeLinear outputs; disabling
    # pre-packing anyway made creating the session several times slower on a 2 GB model)
    return new_session(model, NO_OPTIMIZATION)

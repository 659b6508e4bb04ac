"""Calibration inputs and activation statistics.

Calibration data is read as a stream: arrays are parsed from their .npy headers (inside .npz
files too) and read batch by batch, never all at once, and never with ``allow_pickle``. The
float model runs in onnxruntime on each batch and every observed tensor updates a running
min/max; the tensors themselves are dropped after each batch.

Accepted data (``--calib-data``):

* an ``.npz`` file with one array per model input, named like the input, first axis = samples;
* a folder of such ``.npz`` files (read in file-name order), or, for a model with a single
  input, of ``.npy`` files holding that input's samples (first axis = samples).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import CalibrationDataError, InvalidModelError, first_line
from .histogram import ChannelHistograms, SymmetricHistogram
from .sessions import BASIC_OPTIMIZATION, new_session, onnxruntime_message

# Symbolic (dynamic) dimensions other than the batch axis get this size in synthetic inputs.
SYNTHETIC_DYNAMIC_DIM = 32
# One synthetic sample (all inputs together) is at most this big: a declared shape can be
# anything, and random data of terabytes is a hang or an out-of-memory kill, not calibration.
SYNTHETIC_SAMPLE_MAX_BYTES = 256 << 20
SYNTHETIC_STRING_LENGTH = 8
# A synthetic batch (without a fixed batch dimension) holds at most this much: large declared
# inputs are generated a few samples at a time.
SYNTHETIC_BATCH_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and shape (ints, or None/str for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple

    @property
    def batch_dim(self) -> int | None:
        """The static size of the first (batch) axis, or None when it is dynamic."""
        if not self.shape:
            return None
        first = self.shape[0]
        return first if isinstance(first, int) and first > 0 else None


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


# --------------------------------------------------------------------------------------------
# Streaming .npy reader
# --------------------------------------------------------------------------------------------


@dataclass
class ArraySource:
    """One array on disk, read row block by row block (rows = first axis = samples)."""

    where: str  # for messages: "calib.npz:image"
    shape: tuple
    dtype: np.dtype
    opener: Callable  # returns a binary file object positioned at the .npy magic
    fortran_order: bool

    @property
    def samples(self) -> int:
        return self.shape[0]

    def iter_rows(self, block: int, first: int = 0) -> Iterator[np.ndarray]:
        """Blocks of ``block`` rows from row ``first`` on."""
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with _reading(self.where), self.opener() as f:
            _read_header(f, self.where)
            if self.fortran_order:  # rare; such a file cannot be streamed by rows
                data = np.frombuffer(f.read(), dtype=self.dtype).reshape(self.shape, order="F")
                for start in range(first, self.samples, block):
                    yield np.ascontiguousarray(data[start : start + block])
                return
            if first:
                f.seek(row_bytes * min(first, self.samples), io.SEEK_CUR)
            for start in range(first, self.samples, block):
                count = min(block, self.samples - start)
                buf = f.read(row_bytes * count)
                if len(buf) != row_bytes * count:
                    raise CalibrationDataError(f"{self.where}: file is truncated")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((count,) + row_shape)


def _read_header(f, where: str):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        return np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise CalibrationDataError(f"{where}: not a numpy array file ({exc})")


# What a damaged file or archive member raises while it is read: a bad CRC, corrupt deflate
# data, an unsupported compression method (deflate64), an encrypted member, a cut-off stream,
# a header numpy cannot parse.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError, SyntaxError,
                tokenize.TokenError)  # fmt: skip


@contextlib.contextmanager
def _reading(where: str):
    """Read errors of a calibration file become a one-line calibration-data error."""
    try:
        yield
    except CalibrationDataError:
        raise
    except _READ_ERRORS as exc:
        raise CalibrationDataError(f"{where}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from exc


def _data_bytes(f) -> int:
    """Bytes left to read in an open file or archive member."""
    total = getattr(f, "member_size", None)
    if total is None:
        total = os.fstat(f.fileno()).st_size
    return total - f.tell()


def _array_source(where: str, opener: Callable) -> ArraySource:
    with _reading(where), opener() as f:
        shape, fortran_order, dtype = _read_header(f, where)
        # the header's claim is checked against the file before a byte of data is read: a
        # header that claims 10^12 samples must not be believed
        needed = math.prod(shape) * dtype.itemsize if not dtype.hasobject else 0
        available = _data_bytes(f)
        if needed > available:
            raise CalibrationDataError(
                f"{where}: the header's shape {list(shape)} needs {needed} bytes, the file holds {available}: truncated"
            )
    if dtype.hasobject:
        raise CalibrationDataError(
            f"{where}: holds Python objects; only numeric arrays are accepted (pickles are never loaded)"
        )
    if len(shape) == 0:
        raise CalibrationDataError(f"{where}: is a scalar; expected an array whose first axis is the samples")
    return ArraySource(where, tuple(shape), dtype, opener, fortran_order)


def _npz_sources(path: Path) -> dict[str, ArraySource]:
    try:
        archive = zipfile.ZipFile(path)
    except _READ_ERRORS as exc:  # NotImplementedError: a zip version this Python cannot read
        raise CalibrationDataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {first_line(exc)})")
    sources = {}
    with archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                raise CalibrationDataError(f"{path}: unexpected member {member!r} (an .npz holds .npy arrays)")
            name = member[: -len(".npy")]
            sources[name] = _array_source(f"{path.name}:{name}", lambda p=path, m=member: _ZipMember(p, m))
    return sources


class _ZipMember:
    """Context manager opening one member of a zip file for streaming reads."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member

    def __enter__(self):
        self.archive = zipfile.ZipFile(self.path)
        self.file = self.archive.open(self.member)
        self.file.member_size = self.archive.getinfo(self.member).file_size  # uncompressed
        return self.file

    def __exit__(self, *exc):
        self.file.close()
        self.archive.close()


def _npy_source(path: Path) -> ArraySource:
    return _array_source(path.name, lambda p=path: open(p, "rb"))


# --------------------------------------------------------------------------------------------
# Calibration data sets
# --------------------------------------------------------------------------------------------


def _check_against_input(source: ArraySource, spec: InputSpec) -> bool:
    """Checks one array against its input; True where it stacks whole feeds (one axis more)."""
    kind = spec.dtype.kind
    compatible = {"f": "f", "i": "iu", "u": "iu", "b": "b"}.get(kind, kind)
    if source.dtype.kind not in compatible:
        raise CalibrationDataError(
            f"{source.where}: dtype {source.dtype} does not fit model input {spec.name!r} of type {spec.dtype}"
        )
    stacked = len(source.shape) == len(spec.shape) + 1
    if not stacked and len(source.shape) != len(spec.shape):
        raise CalibrationDataError(
            f"{source.where}: shape {source.shape} has rank {len(source.shape)}, model input {spec.name!r} has rank "
            f"{len(spec.shape)} ({_shape_text(spec.shape)}); the first axis is the samples: give a batch of the "
            f"input's rank, or one more axis in front that stacks whole feeds"
        )
    # a stacked array's samples are whole feeds: every axis after the first is the input's
    compared = zip(source.shape[1:], spec.shape if stacked else spec.shape[1:])
    for axis, (got, want) in enumerate(compared, start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise CalibrationDataError(
                f"{source.where}: shape {source.shape} does not match model input {spec.name!r} "
                f"{_shape_text(spec.shape)} (axis {axis}: {got} != {want})"
            )
    if source.samples == 0:
        raise CalibrationDataError(f"{source.where}: has zero samples")
    return stacked


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


class CalibrationData:
    """A validated set of calibration arrays: a list of groups (one per file), each group
    mapping every model input to its array source."""

    def __init__(self, groups: list[dict[str, ArraySource]], description: str, unbatched: bool = False):
        self.groups = groups
        self.description = description
        # every array stacks whole feeds along a first axis of its own: a batch is one feed,
        # as the model takes it (the first axis of which need not be samples)
        self.unbatched = unbatched

    @property
    def samples(self) -> int:
        return sum(next(iter(g.values())).samples for g in self.groups)

    def batches(self, max_samples: int, batch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches of at most ``batch`` samples, ``max_samples`` in all, after the first ``skip``
        (files in order, a batch never spanning two files)."""
        if self.unbatched:
            for feed in self._batches(max_samples, 1, skip):
                yield {name: rows[0] for name, rows in feed.items()}
            return
        yield from self._batches(max_samples, batch, skip)

    def _batches(self, max_samples: int, batch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        remaining = max_samples
        for group in self.groups:
            if remaining <= 0:
                return
            count = next(iter(group.values())).samples
            if skip >= count:
                skip -= count
                continue
            iterators = {name: src.iter_rows(batch, skip) for name, src in group.items()}
            skip = 0
            while remaining > 0:
                try:
                    feed = {name: next(it) for name, it in iterators.items()}
                except StopIteration:
                    break
                feed = {name: rows[:remaining] for name, rows in feed.items()}
                remaining -= next(iter(feed.values())).shape[0]
                yield feed


def open_calibration_data(path: Path, specs: list[InputSpec]) -> CalibrationData:
    """Opens and validates ``--calib-data`` against the model inputs (headers only)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        unexpected = [p.name for p in files if p.suffix not in (".npz", ".npy") or not p.is_file()]
        if unexpected:
            raise CalibrationDataError(
                f"{path}: unexpected entries {unexpected[:3]}; the folder may hold only .npz or .npy files"
            )
        if not files:
            raise CalibrationDataError(f"{path}: folder holds no .npz or .npy files")
    else:
        if path.suffix not in (".npz", ".npy"):
            raise CalibrationDataError(f"{path}: expected an .npz file or a folder of .npz/.npy files")
        if not path.is_file():  # reading a pipe or /dev/zero would never end
            raise CalibrationDataError(f"{path}: not a regular file (a device, pipe or socket)")
        files = [path]
    groups = []
    for file in files:
        if file.suffix == ".npy":
            if len(specs) != 1:
                raise CalibrationDataError(
                    f"{file}: .npy files need a model with one input; this one has {len(specs)}, use .npz"
                )
            groups.append({specs[0].name: _npy_source(file)})
        else:
            groups.append(_npz_sources(file))
    expected = [s.name for s in specs]
    stacked: dict[bool, list[str]] = {}
    for file, group in zip(files, groups):
        missing = [n for n in expected if n not in group]
        extra = [n for n in group if n not in expected]
        if missing or extra:
            detail = "; ".join(
                p for p in (f"missing {missing}" if missing else "", f"unknown {extra}" if extra else "") if p
            )
            raise CalibrationDataError(f"{file.name}: array names do not match the model inputs {expected} ({detail})")
        counts = {name: src.samples for name, src in group.items()}
        if len(set(counts.values())) != 1:
            raise CalibrationDataError(f"{file.name}: arrays have different sample counts {counts}")
        for spec in specs:
            stacked.setdefault(_check_against_input(group[spec.name], spec), []).append(group[spec.name].where)
    if len(stacked) > 1:
        raise CalibrationDataError(
            f"{stacked[True][0]} stacks whole feeds (one axis more than its input) where {stacked[False][0]} holds a "
            "batch: give every array the same way"
        )
    return CalibrationData(groups, str(path), unbatched=True in stacked)


def integer_input_limits(graph: gs.Graph) -> dict[str, int]:
    """For integer inputs used as Gather indices into a constant table (token ids), the table
    size along the gathered axis: synthetic ids must stay below it."""
    limits = {}
    for tensor in graph.inputs:
        for consumer in tensor.outputs:
            if consumer.op == "Gather" and consumer.inputs[1] is tensor and isinstance(consumer.inputs[0], gs.Constant):
                axis, shape = consumer.attrs.get("axis", 0), consumer.inputs[0].shape
                if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
                    continue  # a malformed axis: running the model reports it
                size = shape[axis]
                limits[tensor.name] = min(limits.get(tensor.name, size), size)
    return limits


def _synthetic_sample_shapes(specs: list[InputSpec]) -> dict[str, list[int]]:
    return {
        spec.name: [d if isinstance(d, int) and d >= 0 else SYNTHETIC_DYNAMIC_DIM for d in spec.shape[1:]]
        for spec in specs
    }


def synthetic_sample_bytes(specs: list[InputSpec]) -> int:
    """Bytes one synthetic sample of every input takes while it is generated (as 8-byte values,
    then cast; a string's 8 letters as 4-byte code points)."""
    shapes = _synthetic_sample_shapes(specs)
    per_element = {spec.name: SYNTHETIC_STRING_LENGTH * 4 if spec.dtype.kind in "OSU" else 8 for spec in specs}
    return sum(int(np.prod(shapes[spec.name], dtype=np.float64)) * per_element[spec.name] for spec in specs)


def synthetic_batches(
    specs: list[InputSpec], samples: int, batch: int, seed: int, int_high: dict[str, int]
) -> Iterator[dict[str, np.ndarray]]:
    """Seeded stand-in inputs: N(0, 1) floats, integers in [0, high), random booleans, random
    lowercase words."""
    sample_shapes = _synthetic_sample_shapes(specs)
    sample_bytes = synthetic_sample_bytes(specs)
    if sample_bytes > SYNTHETIC_SAMPLE_MAX_BYTES:
        declared = ", ".join(f"{spec.name!r} {_shape_text(spec.shape)}" for spec in specs)
        raise CalibrationDataError(
            f"one synthetic sample of the declared inputs ({declared}) would take {sample_bytes / 2**30:,.1f} GiB, "
            f"more than the {SYNTHETIC_SAMPLE_MAX_BYTES >> 20} MiB ocs-onnx generates; pass real inputs with --calib-data"
        )
    rng = np.random.default_rng(seed)
    done = 0
    while done < samples:
        count = min(batch, samples - done)
        feed = {}
        for spec in specs:
            shape = [count] + sample_shapes[spec.name]
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, int_high.get(spec.name, 2), size=shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            elif spec.dtype.kind in "OSU":  # strings: words of random lowercase letters
                letters = rng.integers(ord("a"), ord("z") + 1, size=(*shape, SYNTHETIC_STRING_LENGTH), dtype=np.uint32)
                words = letters.view(f"<U{SYNTHETIC_STRING_LENGTH}").reshape(shape)
                feed[spec.name] = words.astype(object)
            else:
                raise CalibrationDataError(
                    f"cannot make synthetic data for input {spec.name!r} of type {spec.dtype}; pass --calib-data"
                )
        done += count
        yield feed


def prepare_feed(feed: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Casts a batch to the model's input dtypes and refuses NaN/Inf."""
    ready = {}
    for spec in specs:
        array = feed[spec.name]
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CalibrationDataError(f"{where}: input {spec.name!r} contains NaN or Inf")
        ready[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    return ready


# --------------------------------------------------------------------------------------------
# Running the model and observing tensors
# --------------------------------------------------------------------------------------------


class RangeObserver:
    """Running min/max of one tensor and a histogram of its values, updated batch by batch in
    constant memory (clip methods for activations read the histogram). Given a channel layout,
    it also keeps one histogram per channel (activation OCS reads them)."""

    def __init__(self, channel_layout: tuple[int, int] | None = None, peak_axis: int | None = None):
        self.lo = np.inf
        self.hi = -np.inf
        self.histogram = SymmetricHistogram()
        self.channel_axis, channels = channel_layout if channel_layout is not None else (None, 0)
        self.channel_histograms = ChannelHistograms(channels) if channel_layout is not None else None
        # the maximum of every channel along peak_axis (None: not asked for, or not that layout)
        self.peak_axis = peak_axis
        self.channel_peaks: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        if not values.size:
            return
        lo, hi = float(values.min()), float(values.max())
        finite = np.isfinite(lo) and np.isfinite(hi)  # a NaN or Inf anywhere shows in the min or max
        if self.peak_axis is not None:
            self._update_peaks(values, finite)
        if not finite:
            values = values[np.isfinite(values)]  # a NaN/Inf (e.g. behind an Inf weight) has no grid point
            if not values.size:
                return
            lo, hi = float(values.min()), float(values.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.histogram.update(values, peak=max(hi, -lo))
        if self.channel_histograms is not None:
            axis = self.channel_axis
            if values.ndim > (axis if axis >= 0 else -axis - 1) and (
                values.shape[axis] == self.channel_histograms.channels
            ):
                self.channel_histograms.update(values, axis)
            else:  # not the layout the layers promised: no per-channel statistics (no split)
                self.channel_histograms = None

    def _update_peaks(self, values: np.ndarray, finite: bool) -> None:
        axis = self.peak_axis
        if values.ndim <= (axis if axis >= 0 else -axis - 1) or (
            self.channel_peaks is not None and values.shape[axis] != self.channel_peaks.size
        ):
            self.peak_axis, self.channel_peaks = None, None  # not the layer's layout: no peaks
            return
        others = tuple(a for a in range(values.ndim) if a != axis % values.ndim)
        if not finite:
            values = np.where(np.isfinite(values), values, -np.inf)  # no grid point, as above
        peaks = values.max(axis=others).astype(np.float64)
        self.channel_peaks = peaks if self.channel_peaks is None else np.maximum(self.channel_peaks, peaks)

    @property
    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:  # never saw a value (zero-sized tensor)
            return (0.0, 0.0)
        return (self.lo, self.hi)


@dataclass
class ReferenceBatch:
    feed: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class CalibrationResult:
    ranges: dict[str, tuple[float, float]]
    histograms: dict[str, SymmetricHistogram]
    samples: int
    reference: ReferenceBatch | None
    channel_histograms: dict[str, ChannelHistograms] = field(default_factory=dict)
    channel_peaks: dict[str, np.ndarray] = field(default_factory=dict)


# Activations fetched from one calibration run, at most (see observe_ranges). Smaller runs cost
# no time (PP-OCRv5 rec's default compile: 1075 MB peak and 12.0 s at 256 MiB, 366 MB and
# 10.7 s at 64 MiB, the same at 16 MiB: the rest is the session and the model).
FETCH_BUDGET_BYTES = 64 * 2**20


def _rows(feed: dict[str, np.ndarray]) -> int:
    # the feed of a model without inputs is empty, and one run is one sample
    return next(iter(feed.values())).shape[0] if feed else 1


def _run_failure(
    session, outputs, specs, constants, synthetic_feed, rows: int, index: int, exc: Exception
) -> Exception:
    """The error for a batch the model could not run on: the model's fault or the data's."""
    message = onnxruntime_message(exc)
    if synthetic_feed is None:
        return InvalidModelError(
            f"onnxruntime cannot run the model on synthetic inputs (a batch of {rows} of the declared input types "
            f"and shapes, other dynamic dimensions {SYNTHETIC_DYNAMIC_DIM}): {message}; if it needs particular input "
            "sizes or values, pass inputs it runs on with --calib-data"
        )
    try:
        session.run(outputs, {**prepare_feed(synthetic_feed(rows), specs, "synthetic batch"), **constants})
    except Exception:
        return InvalidModelError(
            f"onnxruntime cannot run the model, on calibration batch {index} nor on synthetic inputs: {message}"
        )
    return CalibrationDataError(
        f"onnxruntime cannot run the model on calibration batch {index}, though it runs on synthetic inputs: {message}"
    )


def observe_ranges(
    model: onnx.ModelProto,
    tensor_names: list[str],
    batches: Iterator[dict[str, np.ndarray]],
    specs: list[InputSpec],
    on_batch: Callable[[int], None] | None = None,
    channel_layouts: dict[str, tuple[int, int]] | None = None,
    synthetic_feed: Callable[[int], dict[str, np.ndarray]] | None = None,
    constants: dict[str, np.ndarray] | None = None,
    peak_axes: dict[str, int] | None = None,
    grams: list | None = None,
    unbatched: bool = False,
) -> CalibrationResult:
    """Runs ``model`` on every batch: the range of every tensor, the sample count, and the first
    batch with the model's outputs on it (the reference the quantized model is checked against).
    Tensors in ``channel_layouts`` ({name: (channel axis, channels)}) also get per-channel
    histograms, and tensors in ``peak_axes`` ({name: channel axis}) per-channel maxima; every
    ``InputGram`` in ``grams`` is updated with the tensor it reads (``ocs_onnx/hessian.py``).

    A batch the model cannot run on is the data's fault (CalibrationDataError) only if the model
    runs on synthetic inputs of the same size, ``synthetic_feed(rows)``; otherwise, and always
    when ``synthetic_feed`` is None (the batches are synthetic themselves), the model cannot
    run (InvalidModelError).

    ``constants`` are model inputs that hold weights ({name: values}), fed to every run.
    ``unbatched``: every batch is one sample as the model takes it, never cut."""
    input_names = {s.name for s in specs}
    outputs = [o.name for o in model.graph.output]
    graph_outputs = set(outputs)
    for name in tensor_names:
        if name not in input_names and name not in graph_outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    fetched = [n for n in tensor_names if n not in input_names]
    # without the arena: it would keep the largest run's every fetched tensor for the next run
    # (PP-OCRv5 rec's compile peaks at 290 MB instead of 370 MB)
    calibration_session = new_session(model.SerializeToString(), BASIC_OPTIMIZATION, memory_arena=False)
    constants = constants or {}
    layouts = channel_layouts or {}
    peak_axes = peak_axes or {}
    observers = {name: RangeObserver(layouts.get(name), peak_axes.get(name)) for name in tensor_names}
    samples = 0
    reference = None
    # With a dynamic batch dimension, a batch is run in chunks small enough that the activations
    # fetched from one run stay within the budget (one sample first, to measure them): a detector
    # at 640x640 fetches about 50 MB of activations per sample.
    # None: not measured yet (the first run takes one sample); 0: a fixed batch, never cut.
    chunk = None if all(s.batch_dim is None for s in specs) and not unbatched else 0
    rows_of = (lambda feed: 1) if unbatched else _rows
    probe = None
    for index, feed in enumerate(batches):
        feed = prepare_feed(feed, specs, f"calibration batch {index}")
        rows, start = rows_of(feed), 0
        while start < rows or start == 0:
            size = 1 if chunk is None else (chunk or rows)
            part = feed if start == 0 and size >= rows else {k: v[start : start + size] for k, v in feed.items()}
            try:
                values = calibration_session.run(fetched + outputs, {**part, **constants})
            except Exception as exc:
                raise _run_failure(
                    calibration_session, outputs, specs, constants, synthetic_feed, _rows(part), index, exc
                )
            observed = dict(zip(fetched, values))
            observed.update({name: part[name] for name in tensor_names if name in input_names})
            for name, value in observed.items():
                observers[name].update(value)
            for gram in grams or ():
                if gram.layout.tensor in observed:
                    gram.update(observed[gram.layout.tensor])
            run_outputs = dict(zip(outputs, values[len(fetched) :]))
            if chunk is None:
                per_sample = sum(v.nbytes for v in values[: len(fetched)]) / max(rows_of(part), 1)
                chunk = max(1, int(FETCH_BUDGET_BYTES // max(per_sample, 1.0)))
                probe = ReferenceBatch(part, run_outputs)
            elif reference is None:
                reference = ReferenceBatch(part, run_outputs)
            samples += rows_of(part)
            start += max(rows_of(part), 1)
        if on_batch is not None:
            on_batch(samples)
    reference = reference or probe
    return CalibrationResult(
        {name: obs.range for name, obs in observers.items()},
        {name: obs.histogram for name, obs in observers.items()},
        samples,
        reference,
        {name: obs.channel_histograms for name, obs in observers.items() if obs.channel_histograms is not None},
        {name: obs.channel_peaks for name, obs in observers.items() if obs.channel_peaks is not None},
    )

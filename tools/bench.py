"""ocs-onnx against onnxruntime's own quantizer (quantize_static) and NNCF on real models.

    python tools/bench.py [--models demo,ppocrv5-rec,ppocrv5-cls,ppocrv5-det,ddddocr-det] [--quick | --w8a8]
                          [--out bench.md] [--json bench.json]

For each model: the float metric, then onnxruntime ``quantize_static`` (QDQ, per-channel, QUInt8
activations, QInt8 weights; MinMax, Entropy and Percentile calibration; MinMax with
``reduce_range``, and MinMax with QInt4 weights; models below opset 13 upgraded to 13 first,
which per-channel QDQ needs), NNCF (``nncf.quantize``, default preset, ``model_type=TRANSFORMER``
for attention models, on the model after the same upgrade and onnxruntime's ``quant_pre_process``,
as its users prepare it) and ocs-onnx at W8A8, W6A8, W5A8 and W4A8 with OCS ratios 0, 0.01,
0.02, 0.05, activations clipped at the default 99.99th percentile and unclipped
(``--aclip none``) (``--quick``: ratios 0 and 0.02, default clip; ``--w8a8``: only the W8A8
peers and ocs-onnx's default compile). Every quantizer runs in a
child process on the same model and calibration file, so that its wall time and peak memory
are its own (the child starts from ``tools/peak_rss.py``, a launcher that imports only the
standard library: a child forked from the bench itself would report at least the bench's size). For every output: the task metric, compile time
and peak memory as ratios to onnxruntime's MinMax run on the same model in the same run, the
output size, and the onnxruntime latency of the quantized model relative to the float one (same
process, one thread, interleaved runs, median of per-run ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the checkout, after the installed ocs_onnx: for models/

# (label, calibration method, weight type, reduce_range): onnxruntime's three calibrations with its
# defaults, MinMax with the 7-bit weights that avoid uint8 x int8 overflow on CPUs without VNNI
# (what ocs-onnx does at W8A8), and its 4-bit weights.
ORT_RUNS = (
    ("MinMax", "MinMax", "QInt8", False),
    ("Entropy", "Entropy", "QInt8", False),
    ("Percentile", "Percentile", "QInt8", False),
    ("MinMax reduce_range", "MinMax", "QInt8", True),
    ("MinMax QInt4", "MinMax", "QInt4", False),
)
OCS_BITS = (8, 6, 5, 4)


@dataclass
class BenchModel:
    name: str
    model: Path
    calibration: Path
    # model (path, ModelProto, or an onnxruntime session of it) -> {metric: value}; the first
    # metric is the headline.
    evaluate: Callable[[Path | onnx.ModelProto | ort.InferenceSession], dict[str, float]]
    # One input feed for latency measurements.
    latency_feed: dict[str, np.ndarray]
    # Has attention blocks: NNCF is run with model_type=TRANSFORMER, as its users do.
    transformer: bool = False


def _session(model) -> ort.InferenceSession:
    """A session of a model given as a path, a ModelProto or a session (returned as it is)."""
    if isinstance(model, ort.InferenceSession):
        return model
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def qdq_arithmetic_session(path: Path) -> ort.InferenceSession:
    """A session that runs the model's QDQ arithmetic as written (DequantizeLinear, the float op,
    QuantizeLinear; no integer kernels): what the quantized model means, whatever the CPU."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def demo() -> BenchModel:
    from models import digits

    with np.load(digits.EVALUATION) as data:
        images, labels = data["image"], data["label"]

    def evaluate(model) -> dict[str, float]:
        logits = _session(model).run(None, {"image": images})[0]
        return {"top-1 %": 100 * float(np.mean(logits.argmax(1) == labels))}

    return BenchModel("digits CNN (demo)", digits.MODEL, digits.CALIBRATION, evaluate, {"image": images[:64]})


# The metrics of each OCR task, headline first, in percent.
OCR_METRICS = {
    "rec": {"line accuracy %": "line_accuracy", "CER %": "cer"},
    "cls": {"accuracy %": "accuracy"},
    "det": {"F1 %": "f1", "recall %": "recall", "precision %": "precision"},
}


def ppocrv5(task: str, work: Path) -> BenchModel:
    """A PP-OCRv5 model from the zoo (downloaded once, cached), with its seeded calibration and
    evaluation sets (``models/ocr.py``; needs the ``bench`` extra and fonts-dejavu-core)."""
    from models import ocr, zoo

    model = zoo.fetch(f"ppocrv5-{task}")
    calibration = ocr.save_calibration(work / f"{task}_calib.npz", ocr.dataset(task, "calib"))
    evaluation = ocr.dataset(task, "eval")

    def evaluate(model) -> dict[str, float]:
        result = ocr.evaluate(_session(model), evaluation)
        return {label: 100 * float(result[key]) for label, key in OCR_METRICS[task].items()}

    feed = {ocr.INPUT_NAME: evaluation.inputs[:8]}
    # the recognizer's SVTR neck is attention; the detector and classifier are CNNs
    return BenchModel(f"PP-OCRv5 {task}", model, calibration, evaluate, feed, transformer=task == "rec")


def ddddocr_det(work: Path) -> BenchModel:
    """ddddocr's character detector from the zoo, with its seeded calibration and evaluation sets
    (``models/chardet.py``; needs the ``bench`` extra and fonts-dejavu-core)."""
    from models import chardet, zoo

    model = zoo.fetch("ddddocr-det")
    calibration = chardet.save_calibration(work / "chardet_calib.npz", chardet.dataset("calib"))
    evaluation = chardet.dataset("eval")

    def evaluate(model) -> dict[str, float]:
        result = chardet.evaluate(_session(model), evaluation)
        return {label: 100 * float(result[key]) for label, key in OCR_METRICS["det"].items()}

    # The model's batch dimension is fixed at 1: one image is the whole feed.
    return BenchModel("ddddocr det", model, calibration, evaluate, {chardet.INPUT_NAME: evaluation.inputs[:1]})


def registry() -> dict[str, Callable[[Path], BenchModel]]:
    models: dict[str, Callable[[Path], BenchModel]] = {"demo": lambda _work: demo()}
    for task in ("rec", "cls", "det"):
        models[f"ppocrv5-{task}"] = lambda work, task=task: ppocrv5(task, work)
    models["ddddocr-det"] = ddddocr_det
    return models


def print_per_model(names: list[str], measure: Callable[[str, Path], list[str]]) -> None:
    """Prints the table lines ``measure(name, work)`` returns for every model, as they come, each
    model with its own temporary work folder."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            for line in measure(name, work):
                print(line, flush=True)


def fixed_batch(model: onnx.ModelProto | str | os.PathLike) -> int | None:
    """The static size of the first model input's first axis, or None when it is dynamic."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


# --------------------------------------------------------------------------------------------
# Child processes: one quantizer run each, measured from outside
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    output: Path
    ok: bool
    seconds: float
    peak_rss_mb: float
    error: str = ""


PEAK_RSS_LAUNCHER = Path(__file__).resolve().with_name("peak_rss.py")


def run_child(label: str, command: list[str], output: Path) -> Run:
    """Run one quantizer in its own process, through a small launcher so that the peak RSS
    measured is the quantizer's own and not floored at this process's size."""
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, str(PEAK_RSS_LAUNCHER), *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    lines = process.stderr.decode(errors="replace").strip().splitlines()
    peak_rss_mb = float(lines.pop().split()[1]) if lines and lines[-1].startswith("peak_rss_mb ") else float("nan")
    ok = process.returncode == 0 and output.exists()
    error = "" if ok else (lines[-1] if lines else f"exit {process.returncode}")
    return Run(label, output, ok, seconds, peak_rss_mb, error)


PER_CHANNEL_MIN_OPSET = 13


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def _working_directory(path: str):
    """Run the block in ``path`` as the current directory, then go back (``contextlib.chdir`` is
    Python 3.11+)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def ort_quantize_child(model: str, calibration: str, output: str, method: str, weight_type: str, reduce: str) -> int:
    """The body of an onnxruntime quantize_static child (``--ort-child``)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, batch: int):
            with np.load(calibration) as data:
                arrays = {name: data[name] for name in data.files}
            count = len(next(iter(arrays.values())))
            self.feeds = iter(
                [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, min(count, 128), batch)]
            )

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as folder:
        # Batches of 16, or of the model's own batch size where its input fixes one.
        batch = fixed_batch(model) or 16
        # Per-channel QDQ needs DequantizeLinear's axis (opset 13): at opset 11 quantize_static
        # writes a model onnxruntime cannot load; upgrading first is what a user would do (and
        # what ocs-onnx's upgrade-opset pass does). quant_pre_process is what onnxruntime's
        # documentation asks for before quantizing; where its symbolic shape inference gives up
        # (PP-OCRv5 det), a user skips that step.
        prepared = _prepared(model, folder)
        quantize_static(
            prepared,
            output,
            Reader(batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=getattr(QuantType, weight_type),
            calibrate_method=getattr(CalibrationMethod, method),
            reduce_range=reduce == "True",
        )
    return 0


def _prepared(model: str, folder: str) -> str:
    """The model after an upgrade to opset 13 (per-channel QDQ needs it) and onnxruntime's
    quant_pre_process, as onnxruntime's and NNCF's users prepare it (the pre-processing writes
    temporary files into the working folder where its symbolic shape inference gives up: it
    runs in an empty one)."""
    source = onnx.load(model)
    if _default_opset(source) < PER_CHANNEL_MIN_OPSET:
        model = str(Path(folder) / "upgraded.onnx")
        onnx.save(onnx.version_converter.convert_version(source, PER_CHANNEL_MIN_OPSET), model)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = str(Path(folder) / "prepared.onnx")
    model = os.path.abspath(model)
    with tempfile.TemporaryDirectory() as scratch, _working_directory(scratch):
        try:
            quant_pre_process(model, prepared)
        except Exception:
            quant_pre_process(model, prepared, skip_symbolic_shape=True)
    return prepared


def nncf_quantize_child(model: str, calibration: str, output: str, transformer: str) -> int:
    """The body of an NNCF child (``--nncf-child``): ``nncf.quantize`` with its default preset on
    the prepared model, on the same calibration batches as onnxruntime's run."""
    import nncf

    with np.load(calibration) as data:
        arrays = {name: data[name] for name in data.files}
    with tempfile.TemporaryDirectory() as folder:
        prepared = onnx.load(_prepared(model, folder))
        batch = fixed_batch(prepared) or 16
        count = min(len(next(iter(arrays.values()))), 128)
        feeds = [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, count, batch)]
        options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer == "True" else {}
        quantized = nncf.quantize(prepared, nncf.Dataset(feeds), subset_size=len(feeds), **options)
        onnx.save(quantized, output)
    return 0


def nncf_quantize(subject: BenchModel, work: Path) -> Run:
    output = work / "nncf.onnx"
    command = [sys.executable, str(Path(__file__).resolve()), "--nncf-child", str(subject.model)]
    command += [str(subject.calibration), str(output), str(subject.transformer)]
    return run_child("NNCF", command, output)


# --------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------


def latency_ratios(paths: list[Path], feed: dict[str, np.ndarray], threads: int = 1, rounds: int = 15) -> list[float]:
    """Median over interleaved rounds (every model once per round, so that the machine's drift
    hits all alike) of each model's time / the first model's time; ``threads`` 0 = all cores."""

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = [session(path) for path in paths]
    for s in sessions:
        s.run(None, feed)  # warm-up
    ratios = []
    for _ in range(rounds):
        times = []
        for s in sessions:
            start = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - start)
        ratios.append([t / times[0] for t in times])
    return [float(v) for v in np.median(np.asarray(ratios), axis=0)]


def latency_ratio(float_model: Path, quantized: Path, feed: dict[str, np.ndarray], repeats: int = 15) -> float:
    """Median over interleaved runs of quantized time / float time, one thread each."""
    return latency_ratios([float_model, quantized], feed, threads=1, rounds=repeats)[1]


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def ocs_settings(quick: bool, w8a8: bool = False) -> list[tuple[int, float, str]]:
    """(weight bits, OCS ratio, activation clip method) of every ocs-onnx run."""
    if w8a8:
        return [(8, 0.02, "percentile")]
    ratios = (0.0, 0.02) if quick else (0.0, 0.01, 0.02, 0.05)
    clips = ("percentile",) if quick else ("percentile", "none")
    return [(bits, ratio, clip) for bits in OCS_BITS for clip in clips for ratio in ratios]


def ort_quantize(subject: BenchModel, work: Path, label: str, method: str, weight_type: str, reduce: bool) -> Run:
    """onnxruntime's quantize_static (QDQ, per-channel) of the subject, in a child process."""
    out = work / f"ort-{label.replace(' ', '-')}.onnx"
    command = [sys.executable, str(Path(__file__).resolve()), "--ort-child", str(subject.model)]
    command += [str(subject.calibration), str(out), method, weight_type, str(reduce)]
    return run_child(f"onnxruntime {label}", command, out)


def bench_model(subject: BenchModel, work: Path, quick: bool, w8a8: bool = False) -> dict:
    rows = []
    float_metrics = subject.evaluate(subject.model)
    runs = []
    for label, method, weight_type, reduce in ORT_RUNS:
        if w8a8 and weight_type != "QInt8":
            continue
        bits = "W4A8" if weight_type == "QInt4" else "W8A8"
        runs.append((f"onnxruntime {label}", bits, ort_quantize(subject, work, label, method, weight_type, reduce)))
    runs.append(("NNCF", "W8A8", nncf_quantize(subject, work)))
    for bits, ratio, clip in ocs_settings(quick, w8a8):
        out = work / f"ocs-w{bits}-r{ratio}-{clip}.onnx"
        command = [sys.executable, "-m", "ocs_onnx", "compile", str(subject.model), "-o", str(out), "-q"]
        command += [
            "--wbits",
            str(bits),
            "--ratio",
            str(ratio),
            "--aclip",
            clip,
            "--calib-data",
            str(subject.calibration),
        ]
        label = f"ocs-onnx r={ratio} aclip={clip}"
        runs.append((label, f"W{bits}A8", run_child(label, command, out)))
    baseline = runs[0][2]
    for label, bits, run in runs:
        row = {"quantizer": label, "bits": bits, "ok": run.ok, "error": run.error}
        if run.ok:
            try:
                metrics = subject.evaluate(run.output)
            except Exception as exc:  # a quantizer's output that onnxruntime cannot load or run
                row.update(ok=False, error="output does not run: " + str(exc).strip().splitlines()[-1][-160:])
                rows.append(row)
                continue
            row.update(
                metrics=metrics,
                compile_seconds=run.seconds,
                peak_rss_mb=run.peak_rss_mb,
                time_vs_ort=run.seconds / baseline.seconds if baseline.ok else None,
                memory_vs_ort=run.peak_rss_mb / baseline.peak_rss_mb if baseline.ok else None,
                output_mb=run.output.stat().st_size / 2**20,
                latency_vs_float=latency_ratio(subject.model, run.output, subject.latency_feed),
            )
        rows.append(row)
    return {
        "model": subject.name,
        "float": float_metrics,
        "model_mb": subject.model.stat().st_size / 2**20,
        "runs": rows,
    }


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _headline(row: dict, metric: str) -> str:
    return _fmt(row["metrics"].get(metric)) if row.get("ok") else "failed"


def summary(results: list[dict]) -> list[str]:
    """One line per model: the headline metric of float, onnxruntime's best W8A8 calibration,
    NNCF's default, and ocs-onnx with its defaults at each width (OCS ratio 0 / 0.02), and ocs-onnx's W8A8 compile
    time and peak memory relative to onnxruntime's MinMax run and to NNCF's."""
    low_bits = [b for b in OCS_BITS[1:] if any(r["bits"] == f"W{b}A8" for res in results for r in res["runs"])]
    header = ["model", "metric", "float", "onnxruntime best W8A8", "NNCF W8A8", "ocs-onnx W8A8"]
    header += [f"ocs-onnx W{b}A8 r=0 / 0.02" for b in low_bits]
    header += ["compile time vs ORT / NNCF", "peak memory vs ORT / NNCF"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        metric = next(iter(result["float"]))
        runs = {(r["quantizer"], r["bits"]): r for r in result["runs"]}
        ort = [r for r in result["runs"] if r["quantizer"].startswith("onnxruntime") and r["bits"] == "W8A8"]
        ok = [r for r in ort if r["ok"]]
        best = max(ok, key=lambda r: r["metrics"][metric], default=None)
        best_text = (
            f"{_headline(best, metric)} ({best['quantizer'].removeprefix('onnxruntime ')})" if best else "failed"
        )

        def ocs(bits: int, ratio: float) -> dict:
            return runs.get((f"ocs-onnx r={ratio} aclip=percentile", f"W{bits}A8"), {"ok": False})

        default = ocs(8, 0.02)
        nncf = runs.get(("NNCF", "W8A8"), {"ok": False})
        cells = [result["model"], metric, f"{result['float'][metric]:.2f}", best_text, _headline(nncf, metric)]
        cells.append(_headline(default, metric))
        cells += [f"{_headline(ocs(b, 0.0), metric)} / {_headline(ocs(b, 0.02), metric)}" for b in low_bits]
        for key, ratio_to_ort in (("compile_seconds", "time_vs_ort"), ("peak_rss_mb", "memory_vs_ort")):
            to_nncf = default[key] / nncf[key] if default.get("ok") and nncf.get("ok") else None
            cells.append(f"{_fmt(default.get(ratio_to_ort))} / {_fmt(to_nncf)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: list[dict]) -> str:
    lines = summary(results)
    for result in results:
        metric_names = list(result["float"])
        lines += [
            f"**{result['model']}**: float "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["float"].items())
            + f"; {result['model_mb']:.1f} MB",
            "",
            "| quantizer | bits | "
            + " | ".join(metric_names)
            + " | compile s | vs ORT | peak MB | vs ORT | size MB | latency vs float |",
            "|" + "---|" * (len(metric_names) + 8),
        ]
        for row in result["runs"]:
            if not row["ok"]:
                lines.append(f"| {row['quantizer']} | {row['bits']} | failed: {row['error'][:160]} |")
                continue
            metrics = " | ".join(_fmt(row["metrics"].get(m)) for m in metric_names)
            lines.append(
                f"| {row['quantizer']} | {row['bits']} | {metrics} | {row['compile_seconds']:.1f} | "
                f"{_fmt(row['time_vs_ort'])} | {row['peak_rss_mb']:.0f} | {_fmt(row['memory_vs_ort'])} | "
                f"{row['output_mb']:.2f} | {row['latency_vs_float']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--ort-child":
        return ort_quantize_child(*argv[1:7])
    if argv and argv[0] == "--nncf-child":
        return nncf_quantize_child(*argv[1:5])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help="comma-separated: " + ", ".join(registry()))
    parser.add_argument("--quick", action="store_true", help="ratios 0 and 0.02, default activation clip only")
    parser.add_argument("--w8a8", action="store_true", help="only W8A8: the peers and ocs-onnx's default")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write every number as JSON here")
    args = parser.parse_args(argv)
    available = registry()
    results = []
    names = args.models.split(",")
    unknown = [name for name in names if name not in available]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(available)}")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            work = Path(folder) / name
            work.mkdir()
            results.append(bench_model(available[name](work), work, args.quick, args.w8a8))
            # Written after every model, so that a long run's finished models survive a failure.
            text = markdown(results)
            if args.out:
                args.out.write_text(text + "\n")
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Digests of the compiler's outputs, to check that a refactor leaves every output byte unchanged.

Compiles a fixed set of models (the demo CNN with its calibration data, and every test model of
``models/builders.py``) under a fixed set of configurations through the public API
(``ocs_onnx.compile_file``), and prints as sorted JSON the sha256 of every output model, of its
data file if any, and of its report with the varying keys taken out (``pass_seconds``; paths
reduced to their basename). A compile that fails with an ``OcsError`` is recorded as
``"<ErrorClass>: <message>"``. Model and report digests are kept apart so that each can be
compared on its own. Everything is written to a temporary folder, nothing to the repository.

    python tools/output_digests.py --out before.json      # before the change
    python tools/output_digests.py --compare before.json  # after it: exit 1 if anything differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import onnx

import ocs_onnx

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root, for models/

import models  # noqa: E402
from models import builders  # noqa: E402

MODELS_DIR = Path(models.__file__).resolve().parent
DEMO = MODELS_DIR / "demo" / "digits_cnn.onnx"
DEMO_CALIB = MODELS_DIR / "demo" / "digits_calib.npz"

CONFIGS = {
    "default": {},
    "w6_r0.02": dict(wbits=6, ratio=0.02),
    "w4_r0.05_wclip_mse": dict(wbits=4, ratio=0.05, wclip="mse"),
    "tensor_naive_r0.05": dict(granularity="tensor", split="naive", ratio=0.05),
    "act_ratio0.05": dict(act_ratio=0.05),
    "weight_only": dict(abits=None),
    "int8_aclip_kl": dict(activation_type="int8", aclip="kl"),
    "no_guard_r0.1": dict(ocs_guard=False, ratio=0.1),
    "external_data": dict(external_data=True),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stable_report(report: dict) -> dict:
    """The report without what legitimately varies between runs: timings and absolute paths."""
    report = dict(report)
    report.pop("pass_seconds", None)
    for key in ("source", "output", "output_data"):
        if report.get(key):
            report[key] = Path(report[key]).name
    report["config"] = dict(report["config"])
    if report["config"].get("calib_data"):
        report["config"]["calib_data"] = Path(report["config"]["calib_data"]).name
    source = report.get("calibration", {}).get("source")
    if source not in (None, "synthetic"):
        report["calibration"] = dict(report["calibration"], source=Path(source).name)
    return report


def digest_one(source: Path, options: dict, tmp: Path) -> tuple[dict | str, str]:
    """(model digests, report digest) of one compile, or the same error text for both."""
    out_dir = tmp / "out"
    out_dir.mkdir()
    output, report_path = out_dir / "model.q.onnx", out_dir / "report.json"
    try:
        ocs_onnx.compile_file(source, output, report_path=report_path, **options)
        data = output.with_name(output.name + ".data")
        files = {"model": sha256(output), "data": sha256(data) if data.exists() else None}
        report = json.dumps(stable_report(json.loads(report_path.read_text())), sort_keys=True)
        return files, hashlib.sha256(report.encode()).hexdigest()
    except ocs_onnx.OcsError as exc:
        error = f"{type(exc).__name__}: {exc}"
        for path, placeholder in ((tmp, "<tmp>"), (MODELS_DIR.parent, "<repo>")):
            error = error.replace(str(path), placeholder)
        return error, error
    finally:
        shutil.rmtree(out_dir)


def compute() -> dict:
    result = {"models": {}, "reports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"digits_cnn": (DEMO, {"calib_data": DEMO_CALIB})}
        for name, build in builders.ALL_TEST_MODELS.items():
            path = tmp / "inputs" / f"{name}.onnx"
            path.parent.mkdir(exist_ok=True)
            onnx.save(build(), path)
            sources[name] = (path, {})
        for name, (path, base) in sources.items():
            for config_name, options in CONFIGS.items():
                print(f"  {name} / {config_name}", file=sys.stderr)
                files, report = digest_one(path, {**base, **options}, tmp)
                result["models"].setdefault(name, {})[config_name] = files
                result["reports"].setdefault(name, {})[config_name] = report
    return result


def differences(before: dict, after: dict) -> list[str]:
    lines = []
    for section in ("models", "reports"):
        old, new = before.get(section, {}), after.get(section, {})
        for name in sorted(set(old) | set(new)):
            for config in sorted(set(old.get(name, {})) | set(new.get(name, {}))):
                a, b = old.get(name, {}).get(config), new.get(name, {}).get(config)
                if a != b:
                    a, b = (json.dumps(x, sort_keys=True) for x in (a, b))
                    lines.append(f"{section} {name}/{config}: {a} -> {b}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the digests to this JSON file")
    parser.add_argument("--compare", type=Path, help="compare with a previous --out; exit 1 on any difference")
    args = parser.parse_args()
    logging.getLogger("ocs_onnx").setLevel(logging.ERROR)  # the synthetic-calibration warnings
    print(f"ocs_onnx: {ocs_onnx.__file__}\nmodels: {MODELS_DIR}", file=sys.stderr)
    before = json.loads(args.compare.read_text()) if args.compare else None
    result = compute()
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if before is not None:
        diff = differences(before, result)
        print("\n".join(diff) or "identical", file=sys.stderr)
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prints the statistics of the command-line fuzzer (tests/test_fuzz.py) as a markdown table.

By default it reads the statistics the last ``python -m pytest`` run stored in the pytest cache;
``--run`` runs the fuzzer here instead (same seed and cases, so the same table).

    python tools/fuzz_stats.py [--run] [--seed N] [--cases N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the checkout, after the installed ocs_onnx: for tests/ and models/

from tests.test_fuzz import CASES, SEED, STATS_CACHE_KEY, fuzz  # noqa: E402

EXIT_MEANINGS = {
    "2": "usage error",
    "3": "invalid model",
    "4": "unsupported model",
    "5": "calibration data error",
    "6": "verification failure",
    "130": "interrupted (SIGINT)",
    "143": "terminated (SIGTERM)",
}


def cached_stats() -> dict | None:
    path = ROOT / ".pytest_cache" / "v" / STATS_CACHE_KEY
    return json.loads(path.read_text()) if path.exists() else None


def table(stats: dict) -> str:
    rows = [("cases", stats["cases"])]
    rows += [
        (f"clean error, exit {code} ({EXIT_MEANINGS.get(code, '?')})", count)
        for code, count in sorted(stats["clean_errors"].items())
    ]
    rows += [("valid output (exit 0)", stats["valid_outputs"]), ("crashes", stats["crashes"])]
    lines = [
        f"Fuzzer: seed {stats['seed']}, {stats['seconds']:.0f} s",
        "",
        "| outcome | cases |",
        "|---|---|",
    ]
    lines += [f"| {name} | {count} |" for name, count in rows]
    lines += [f"\ncrash: {case}" for case in stats.get("crash_cases", [])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the fuzzer instead of reading the pytest cache")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--cases", type=int, default=CASES)
    args = parser.parse_args()
    stats = None if args.run else cached_stats()
    if stats is None:
        stats = fuzz(cases=args.cases, seed=args.seed, budget=float("inf")).as_dict()
    print(table(stats))
    return 1 if stats["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

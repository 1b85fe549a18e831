"""Whole-process start-up of `edje-search` commands: median wall time of N runs each.

    python -m benchmarks.startup --index indexes/demo [--repeats 5] [--query "a red circle"]

Each command runs as a fresh process (as a user would type it), so the figure includes the
interpreter, imports, opening the index and, for `query`, loading the model and one search.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def time_command(argv: list[str], repeats: int) -> dict:
    """Median and spread of ``repeats`` runs of ``argv``; raises if a run fails."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, help="an existing index directory")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--query", default=None, help="also time one `query` with this text")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "edje_search_cli"]
    commands = {
        "--help": exe + ["--help"],
        "models": exe + ["models"],
        "info": exe + ["info", "--index", args.index],
        "verify": exe + ["verify", "--index", args.index],
        "import edje_search": [sys.executable, "-c", "import edje_search"],
    }
    if args.query:
        commands["query"] = exe + ["query", args.query, "--index", args.index, "-k", "3"]
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    results = {name: time_command(argv, args.repeats) for name, argv in commands.items()}
    if args.json:
        print(json.dumps({"env": env_note, "results": results}, indent=2))
        return
    print(f"median of {args.repeats} whole-process runs ({env_note})")
    for name, r in results.items():
        print(f"{name:>20}: {r['median_s']:.2f} s  (min {r['min_s']:.2f}, max {r['max_s']:.2f})")


if __name__ == "__main__":
    main()

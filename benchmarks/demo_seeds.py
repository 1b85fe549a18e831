"""Seed-to-seed spread of the demo: mean and range of R@1 over `edje-search eval --out` files.

    python -m benchmarks.demo_seeds --out benchmarks/results/eval_demo_seeds_1200.json \
        0=benchmarks/results/eval_demo_test_1200_threads2.json 1=runs/seed1/eval_test.json ...

Each file is one demo run's evaluation on the 1,000 test images (rerank top 10). The row named
"first stage" is the embedding alone; the reranker's row with fusion weight 0 is the joint-encoder
logit alone; a row with a weight above 0, if any, is the fused score (weight from `calibrate`).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def r1(row: dict) -> dict:
    return {"t2i": round(row["t2i"]["R@1"], 2), "i2t": round(row["i2t"]["R@1"], 2)}


def one_run(path: Path) -> dict:
    rows = json.loads(path.read_text())["rows"]
    first = next(r for r in rows if r["name"] == "first stage")
    alone = next(r for r in rows if r.get("fusion_weight", None) == 0.0)
    fused = next((r for r in rows if r.get("fusion_weight", 0.0) > 0.0), None)
    out = {"file": str(path), "first_stage": r1(first), "logit_alone": r1(alone),
           "gain_logit_alone": {d: round(alone[d]["R@1"] - first[d]["R@1"], 2) for d in ("t2i", "i2t")}}
    if fused is not None:
        out |= {"fused": r1(fused), "fusion_weight": fused["fusion_weight"]}
    return out


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 2), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="SEED=EVAL_JSON, one per demo run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="", help="what differs between the runs besides the seed")
    args = ap.parse_args()
    per_seed = {seed: one_run(Path(path)) for seed, path in (r.split("=", 1) for r in args.runs)}
    summary = {key: {d: spread([run[key][d] for run in per_seed.values()]) for d in ("t2i", "i2t")}
               for key in ("first_stage", "logit_alone", "gain_logit_alone")}
    if all("fused" in run for run in per_seed.values()):
        summary["fused"] = {d: spread([run["fused"][d] for run in per_seed.values()]) for d in ("t2i", "i2t")}
    result = {"what": "scripts/demo.sh with several seeds: R@1 on the 1,000 test images, rerank top 10; "
                      "logit alone = fusion weight 0", "note": args.note, "per_seed": per_seed, "summary": summary}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in summary.items():
        cells = (f"{d} {v['mean']:.1f} ({v['min']:.1f}-{v['max']:.1f})" for d, v in value.items())
        print(f"{key:>18}: " + "  ".join(cells))


if __name__ == "__main__":
    main()

"""An index that grows to 1M rows through Engine.add_embeddings, measured commit by commit.

    python -m benchmarks.scale                 # 1,000,000 rows (about 9 GB of disk under --dir)
    python -m benchmarks.scale --rows 100000   # a quicker look

Synthetic first-stage vectors (1024-d, clustered like real embeddings: 50,000 centres plus
noise, L2-normalised) and int8 tokens of a small shape are added in batches of 10,000, one
commit each. After every commit the writer's maintenance (Engine.optimize: merges and
retraining) runs and is timed apart, as build-index runs it after its commits. Reports
per-commit time along the way, open time and RAM of a fresh process at the end, query p50
(FAISS + token gather, k=10, rerank_k=50) and recall@10 against exact search.
Writes benchmarks/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edje_search.config import IndexConfig
from edje_search.engine import Engine
from edje_search.storage import vector_index
from edje_search.storage.index_store import IndexStore
from edje_search.storage.token_store import bytes_per_image

RESULTS = Path(__file__).parent / "results" / "scale.json"


class Vectors:
    """Deterministic clustered unit vectors, produced batch by batch."""

    def __init__(self, dim: int, n_centres: int = 50_000, noise: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((n_centres, dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.dim, self.noise = dim, noise

    def batch(self, start: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(start + 1)
        v = self.centres[rng.integers(0, len(self.centres), n)]
        v = v + rng.standard_normal((n, self.dim)).astype(np.float32) * (self.noise / np.sqrt(self.dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def open_probe(index: Path, queries: np.ndarray, k: int, rerank_k: int, n_gather: int) -> dict:
    """Run in a fresh process: open time, RAM, query and gather latency."""
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    store = IndexStore.open(index)
    open_s = time.perf_counter() - t0
    rss_open = _rss_mb()
    lat = []
    for q in queries:
        t = time.perf_counter()
        _, rows = store.search(q[None], rerank_k)
        store.tokens.get(rows[0][rows[0] >= 0][:rerank_k])
        lat.append(time.perf_counter() - t)
    rng = np.random.default_rng(1)
    gathers = []
    for _ in range(50):
        rows = rng.choice(store.n_rows, n_gather, replace=False)
        t = time.perf_counter()
        store.tokens.get(rows)
        gathers.append(time.perf_counter() - t)
    _, found = store.search(queries, k)
    return {"open_s": open_s, "rss_mb_before_open": rss_before, "rss_mb_after_open": rss_open,
            "rss_mb_after_queries": _rss_mb(),
            "query_p50_ms": 1000 * statistics.median(lat[5:]), "query_p95_ms": 1000 * float(np.percentile(lat[5:], 95)),
            f"gather_{n_gather}_rows_p50_ms": 1000 * statistics.median(gathers[5:]),
            "found": found.tolist(), "recipe": store.recipe, "nprobe": store.settings.get("nprobe"),
            "faiss_segments": len(store.faiss_segments), "rows": store.n_rows}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_top_k(index: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows by streaming every stored vector once."""
    store = IndexStore.open(index)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.full((len(queries), k), -1, np.int64)
    for start, vecs in store.vector_array.iter_rows(batch=100_000):
        s = queries @ np.asarray(vecs).T
        rows = np.broadcast_to(np.arange(start, start + len(vecs)), s.shape)
        cat_s, cat_r = np.concatenate([best_s, s], 1), np.concatenate([best_r, rows], 1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_r, top, 1)
    return best_r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tokens", type=int, nargs=2, default=(8, 64), metavar=("M", "D"),
                    help="token shape per row stored here (the paper's is 64 x 384)")
    ap.add_argument("--centres", type=int, default=50_000, help="clusters of the synthetic vectors")
    ap.add_argument("--noise", type=float, default=1.0, help="noise norm around a centre (1.0: a point is as "
                    "far from its centre as the centre's norm; smaller = tighter clusters, easier for IVF)")
    ap.add_argument("--out", default=str(RESULTS), help="result file")
    ap.add_argument("--dir", default="runs/scale", help="where the index is built (removed first)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    index = Path(args.dir) / "index"
    gen = Vectors(args.dim, args.centres, args.noise)
    queries = gen.batch(10**9, 100)
    if args.probe:  # child process: measurements of a freshly opened index
        print(json.dumps(open_probe(index, queries, 10, 50, 100)))
        return

    shutil.rmtree(index, ignore_errors=True)
    m, d = args.tokens
    cfg = IndexConfig(dim=args.dim, tokens_per_image=m, token_width=d, token_dtype="int8", factory="auto",
                      model_path="(synthetic: vectors given)", model_fingerprint="synthetic")
    engine = Engine(IndexStore.create(index, cfg), model=None)  # add_embeddings needs no model
    rng = np.random.default_rng(0)
    commits, maintenance = [], []
    for start in range(0, args.rows, args.batch):
        n = min(args.batch, args.rows - start)
        vecs = gen.batch(start, n)
        toks = rng.standard_normal((n, m, d)).astype(np.float16)
        paths = [f"synthetic/{i:09d}.jpg" for i in range(start, start + n)]
        t = time.perf_counter()
        engine.add_embeddings(paths, vecs, toks, optimize=False)
        commits.append({"rows_after": start + n, "commit_s": time.perf_counter() - t})
        t = time.perf_counter()
        did = engine.optimize()
        maintenance.append({"rows_after": start + n, "seconds": time.perf_counter() - t, **did})
        print(f"{start + n:>9} rows  commit {commits[-1]['commit_s']:.3f} s  "
              f"optimize {maintenance[-1]['seconds']:.2f} s {did['action']}", flush=True)

    probe = json.loads(subprocess.run([sys.executable, "-m", "benchmarks.scale", "--probe", "1", "--dir", args.dir,
                                       "--dim", str(args.dim), "--centres", str(args.centres),
                                       "--noise", str(args.noise)], check=True, capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
                                      ).stdout.strip().splitlines()[-1])
    truth = exact_top_k(index, queries, 10)
    found = np.asarray(probe.pop("found"))
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))

    def at(n: int) -> float:
        return next(c["commit_s"] for c in commits if c["rows_after"] >= n)

    disk = sum(p.stat().st_size for p in index.rglob("*") if p.is_file())
    paper_row = {"vector_float32": 4 * 1024, "tokens_fp16_64x384": bytes_per_image(64, 384, "float16"),
                 "tokens_int8_64x384": bytes_per_image(64, 384, "int8"), "faiss_ivf_flat_1024d": 4 * 1024 + 8,
                 "faiss_opq64_ivf_pq64": 64 + 8, "manifest_sqlite_approx": 150}
    result = {
        "command": f"python -m benchmarks.scale --rows {args.rows} --centres {args.centres} --noise {args.noise}",
        "centres": args.centres, "noise": args.noise,
        "rows": args.rows, "batch": args.batch, "dim": args.dim, "token_shape": [m, d], "token_dtype": "int8",
        "commit_s": {"first": commits[0]["commit_s"], "at_100k": at(min(100_000, args.rows)),
                     "last": commits[-1]["commit_s"],
                     "median": statistics.median(c["commit_s"] for c in commits),
                     "last_over_first": commits[-1]["commit_s"] / commits[0]["commit_s"]},
        "maintenance_s_total": sum(x["seconds"] for x in maintenance),
        "maintenance_events": [x for x in maintenance if x["action"] != "none"],
        **probe, "recall_at_10_vs_exact": recall,
        "disk_bytes": disk, "disk_bytes_per_row": disk / args.rows,
        "paper_shape_bytes_per_row": paper_row,
        "commits": commits, "machine": _machine(),
    }
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("commits", "maintenance_events")}
    print(json.dumps(summary, indent=1))


def _machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "faiss": vector_index.faiss.__version__}


if __name__ == "__main__":
    main()

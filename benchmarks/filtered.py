"""Filtered search: recall@10 against exact search over the filtered rows, and p50 latency,
at 50%, 5% and 0.1% selectivity, beside unfiltered search on the same index and queries.

Synthetic clustered unit vectors go straight into an IndexStore (no model), with one metadata
field ``bucket`` (row mod 1000) to filter on. Queries are stored vectors plus the noise the
nprobe tuning uses. Each selectivity is measured twice: the automatic choice (exact scan of the
selected rows when they are few, else the FAISS ID selector) and the ID selector forced.

    python -m benchmarks.filtered --rows 20000 --factory IVF64,Flat --out benchmarks/results/filtered_20k.json

``--data scale`` takes the vectors of benchmarks/scale.py instead (``--dim`` wide, 50,000 centres,
noise 1.0: far harder for IVF than the default's 100 rows per tight cluster), with queries drawn
from the same generator as scale.py's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edje_search.config import IndexConfig
from edje_search.storage import filtered_search
from edje_search.storage.index_store import IndexStore


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(got, truth):
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got.tolist(), truth.tolist())]))


def _p50_ms(fn, queries):
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--factory", default="IVF64,Flat")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--data", choices=["clusters", "scale"], default="clusters",
                    help="clusters: n/100 tight clusters (default); scale: benchmarks/scale.py's generator")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, dim = a.rows, a.dim
    if a.data == "scale":
        from benchmarks.scale import Vectors

        gen = Vectors(dim)
        vectors = np.concatenate([gen.batch(s, min(100_000, n - s)) for s in range(0, n, 100_000)])
    else:
        centres = rng.standard_normal((max(n // 100, 10), dim))
        vectors = _unit(centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim)))
    config = IndexConfig(factory=a.factory, dim=dim, tokens_per_image=1, token_width=2, token_dtype="float16",
                         model_path="m", model_fingerprint="f")
    with tempfile.TemporaryDirectory() as tmp:
        store = IndexStore.create(Path(tmp) / "idx", config)
        with store.writing():
            store.commit([f"/p/{i}.jpg" for i in range(n)], [None] * n, vectors, np.zeros((n, 1, 2), np.float16),
                         new_meta=[{"bucket": i % 1000} for i in range(n)])
            trained = store.optimize()
        if a.data == "scale":
            queries = gen.batch(10**9, a.queries)
        else:
            queries = _unit(vectors[rng.integers(0, n, a.queries)] + 0.5 / np.sqrt(dim)
                            * rng.standard_normal((a.queries, dim)))
        _, got = store.search(queries, 10)
        out = {"command": "python -m benchmarks.filtered " + " ".join(sys.argv[1:]), "data": a.data,
               "rows": n, "dim": dim, "recipe": store.recipe, "nprobe": store.settings.get("nprobe"),
               "optimize": trained, "queries": a.queries,
               "unfiltered": {"recall_at_10": _recall(got, np.argsort(-(queries @ vectors.T), axis=1)[:, :10]),
                              "p50_ms": _p50_ms(lambda q: store.search(q, 10), queries)},
               "filtered": []}
        exact_max = filtered_search.EXACT_MAX_ROWS
        for expr, share in [("bucket < 500", 0.5), ("bucket < 50", 0.05), ("bucket < 1", 0.001)]:
            t = time.perf_counter()
            rows = filtered_search.select_rows(store, expr)
            select_ms = 1000 * (time.perf_counter() - t)
            truth = rows[np.argsort(-(queries @ vectors[rows].T), axis=1)[:, :10]]
            for mode, limit in (("auto", exact_max), ("id_selector", 0)):
                filtered_search.EXACT_MAX_ROWS = limit
                _, got = filtered_search.search_rows(store, queries, 10, rows)
                out["filtered"].append({
                    "where": expr, "selectivity": share, "rows_passing": int(len(rows)), "mode": mode,
                    "path": "exact scan" if len(rows) <= limit else "FAISS IDSelectorBatch",
                    "recall_at_10": _recall(got, truth), "select_rows_ms": select_ms,
                    "search_p50_ms": _p50_ms(lambda q, r=rows: filtered_search.search_rows(store, q, 10, r), queries)})
            filtered_search.EXACT_MAX_ROWS = exact_max
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

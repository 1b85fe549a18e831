"""Time of a filter's SQL row selection (storage/filtered_search.select_rows) at 200,000 rows,
before and after the manifest's expression indexes exist (filtered_search.ensure_field_indexes).
Best of 3 per filter; ``make`` "Leica" is 0.1% of the rows, "Canon" about 25%; ``width`` has no index.

    python -m benchmarks.filter_select > benchmarks/results/filter_select_200k.json
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edje_search.config import IndexConfig
from edje_search.storage import filtered_search
from edje_search.storage.index_store import IndexStore

FILTERS = ['make = "Leica"', 'taken >= "2021-06-01" and taken < "2021-07-01"', 'folder = "/p/7"', "width = 120",
           'make = "Canon"']


def main(n: int = 200_000, dim: int = 8) -> None:
    config = IndexConfig(factory="Flat", dim=dim, tokens_per_image=1, token_width=2, token_dtype="float16",
                         model_path="m", model_fingerprint="f")
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    makes = ["Canon", "Nikon", "Sony", "Fuji"]
    meta = [{"make": makes[i % 4] if i % 1000 else "Leica", "folder": f"/p/{i % 500}", "width": 100 + i % 50,
             "taken": f"20{10 + i % 14}-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00"} for i in range(n)]
    commit_s = {}
    for indexed in (True, False):  # the commit of every row, with the expression indexes present or not
        store = IndexStore.create(Path(tempfile.mkdtemp()) / "idx", config)
        with store.writing():
            if indexed:
                filtered_search.ensure_field_indexes(store.manifest)
            t = time.perf_counter()
            store.commit([f"/p/{i % 500}/{i}.jpg" for i in range(n)], [None] * n, v,
                         np.zeros((n, 1, 2), np.float16), new_meta=meta)
            commit_s["with_indexes" if indexed else "without_indexes"] = round(time.perf_counter() - t, 2)

    def timed(expr: str) -> dict:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            rows = filtered_search.select_rows(store, expr)
            best = min(best, time.perf_counter() - t)
        return {"rows": int(len(rows)), "ms": round(1000 * best, 2)}

    out = {"rows": n, "commit_s": commit_s, "before": {e: timed(e) for e in FILTERS}}
    with store.writing():
        t = time.perf_counter()
        filtered_search.ensure_field_indexes(store.manifest)
        out["index_build_s"] = round(time.perf_counter() - t, 2)
    out["after"] = {e: timed(e) for e in FILTERS}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Cold token gathers under tensorstore cache settings: why shard indexes get a pool of their own.

Builds a float16 store of ``--rows`` rows (64 x 384, commits of 10,000, through
``Engine.add_embeddings``) in ``--dir``, then for each setting opens the token array afresh with
its own context, reads one row of every shard (so the shard indexes are cached, as in a serving
process), drops the page cache (needs root) and times 200 gathers of 100 random live rows:

* one pool: indexes and rows share one cache pool (the layout before this benchmark);
* separate pools: rows uncached, shard indexes in a pool of their own (what the engine uses);
* separate pools, 64 reads in flight instead of 32;
* separate pools, cached indexes not revalidated on read (``recheck_cached_data: "open"``).

The pools are the engine's 64 MiB scaled to the store (``--pool-mib``, default 64 MiB x rows / 1M):
at 1M rows a 64 MiB pool holds the 16 MiB of shard indexes while each gather pushes 4.9 MB of rows
through it, and a smaller store with a proportionally smaller pool shows the same eviction in a
few minutes instead of an hour.

    python -m benchmarks.gather_cache --rows 200000 --dir /work/bench-tmp/cache
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.disk_floor import drop_page_cache
from benchmarks.token_gather import Rows, build_zarr
from edje_search.storage.zarr_rows import DOMAIN_ROWS

RESULTS = Path(__file__).parent / "results" / "gather_cache.json"
MiB = 1 << 20


def settings(pool: int) -> dict:
    separate = {"cache_pool": {"total_bytes_limit": 0}, "cache_pool#shard_index": {"total_bytes_limit": pool}}
    return {
        "one pool": ({"cache_pool": {"total_bytes_limit": pool}, "file_io_concurrency": {"limit": 32}},
                     {"metadata_cache_pool": "cache_pool"}),
        "separate pools": ({**separate, "file_io_concurrency": {"limit": 32}},
                           {"metadata_cache_pool": "cache_pool#shard_index"}),
        "separate pools, 64 in flight": ({**separate, "file_io_concurrency": {"limit": 64}},
                                         {"metadata_cache_pool": "cache_pool#shard_index"}),
        "separate pools, no revalidation": ({**separate, "file_io_concurrency": {"limit": 32}},
                                            {"metadata_cache_pool": "cache_pool#shard_index",
                                             "recheck_cached_data": "open"}),
    }


def main() -> None:
    import tensorstore as ts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--pool-mib", type=float, default=None, help="cache pool size (default: 64 x rows / 1M)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    pool = int((args.pool_mib if args.pool_mib is not None else 64 * args.rows / 1_000_000) * MiB)
    shutil.rmtree(args.dir, ignore_errors=True)
    store, _ = build_zarr(args.dir, "float16", Rows(), args.rows, 10_000)
    rows = store.tokens.arrays["tokens"]
    live = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    firsts = live[np.unique(live // rows.shard_rows, return_index=True)[1]]
    pick = np.random.default_rng(1)
    out = {"command": f"python -m benchmarks.gather_cache --rows {args.rows}", "rows": args.rows,
           "pool_mib": pool / MiB, "p50_ms": {}, "p90_ms": {}}
    for name, (context, extra) in settings(pool).items():
        handle = ts.open({**rows._spec(DOMAIN_ROWS), **extra}, open=True, create=True, assume_metadata=True,
                         context=ts.Context(context)).result()
        for s in range(0, len(firsts), 1000):
            handle[firsts[s:s + 1000]].read().result()
        dropped = drop_page_cache()
        times = []
        for _ in range(args.repeats):
            idx = pick.choice(live, 100, replace=False)
            t = time.perf_counter()
            handle[idx].read().result()
            times.append(1000 * (time.perf_counter() - t))
        out["p50_ms"][name], out["p90_ms"][name] = statistics.median(times), float(np.percentile(times, 90))
        out["page_cache_dropped"] = dropped
        print(f"{name}: p50 {out['p50_ms'][name]:.2f} ms, p90 {out['p90_ms'][name]:.2f} ms", flush=True)
    shutil.rmtree(args.dir)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

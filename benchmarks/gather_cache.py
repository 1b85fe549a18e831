"""Where a token gather's time goes: tensorstore settings against plain reads of the same bytes.

Builds a float16 store of ``--rows`` rows (64 x 384, commits of 10,000, through
``Engine.add_embeddings``) in ``--dir``. Each setting opens the token array afresh with its own
context and reads one row of every shard (so the shard indexes are cached, as in a serving
process), then, with the page cache dropped (needs root), times ``--repeats`` gathers of 100
random live rows ("cold") and 60 gathers of rows read just before ("warm": what is left is the
work per row, not the disk):

* revalidating: a cached shard index is checked against its file before each read (tensorstore's
  default ``recheck_cached_data``: a file status per row read);
* engine: cached shard indexes trusted until the array is reopened (``recheck_cached_data:
  "open"``; storage/zarr_rows.py says why that is safe), 32 reads in flight;
* engine with 16 and 64 reads in flight;
* pread: the same rows' byte ranges, found in shard indexes parsed once, read with ``os.pread``
  from 32 Python threads: no format, no checksum; the floor a gather through any library meets.

The settings run in ``--rounds`` alternating rounds (this machine's speed drifts); each figure is
the median over all rounds' gathers, and each round's median is kept too.

    python -m benchmarks.gather_cache --rows 200000 --dir /work/bench-tmp/cache
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.disk_floor import drop_page_cache
from benchmarks.token_gather import Rows, build_zarr
from edje_search.storage.zarr_io import READ_CONTEXT
from edje_search.storage.zarr_rows import DOMAIN_ROWS

RESULTS = Path(__file__).parent / "results" / "gather_cache.json"
WARM_REPEATS = 60


def settings() -> dict:
    """name -> (context changes, spec changes) against what the engine opens."""
    return {
        "revalidating": ({}, {"recheck_cached_data": True}),
        "engine": ({}, {}),
        "engine, 16 in flight": ({"file_io_concurrency": {"limit": 16}}, {}),
        "engine, 64 in flight": ({"file_io_concurrency": {"limit": 64}}, {}),
    }


class PlainReads:
    """The rows' byte ranges from shard indexes parsed once, read with os.pread on 32 threads."""

    def __init__(self, rows, shards):
        self.dir, self.shard_rows = Path(rows.url), rows.shard_rows
        self.index, self.fds = {}, {}
        tail = self.shard_rows * 16 + 4  # (offset, length) per row, then the index's CRC-32C
        for s in shards:
            path = self.dir / rows.shard_key(s)
            self.fds[s] = os.open(path, os.O_RDONLY)
            self.index[s] = np.frombuffer(os.pread(self.fds[s], tail, path.stat().st_size - tail)[:-4],
                                          dtype="<u8").reshape(-1, 2)
        self.pool = ThreadPoolExecutor(32)

    def _one(self, row: int) -> bytes:
        s, i = divmod(row, self.shard_rows)
        offset, length = self.index[s][i]
        return os.pread(self.fds[s], int(length), int(offset))

    def __call__(self, rows) -> list:
        return list(self.pool.map(self._one, (int(r) for r in rows)))

    def close(self) -> None:
        self.pool.shutdown()
        for fd in self.fds.values():
            os.close(fd)


def time_gathers(read, picks) -> tuple[list[float], list[float]]:
    """(cold times, warm times) in ms: fresh random rows after a page-cache drop, then rows
    read just before."""
    drop_page_cache()
    cold = []
    for rows in picks[:-WARM_REPEATS]:
        t = time.perf_counter()
        read(rows)
        cold.append(1000 * (time.perf_counter() - t))
    warm = []
    for rows in picks[-WARM_REPEATS:]:
        read(rows)
        t = time.perf_counter()
        read(rows)
        warm.append(1000 * (time.perf_counter() - t))
    return cold, warm


def main() -> None:
    import tensorstore as ts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    store, _ = build_zarr(args.dir, "float16", Rows(), args.rows, 10_000)
    rows = store.tokens.arrays["tokens"]
    live = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    firsts = live[np.unique(live // rows.shard_rows, return_index=True)[1]]
    pick = np.random.default_rng(1)
    times: dict[str, dict[str, list]] = {}

    def gathers():
        return [pick.choice(live, 100, replace=False) for _ in range(args.repeats + WARM_REPEATS)]

    for _ in range(args.rounds):
        for name, (context, spec) in settings().items():
            handle = ts.open({**rows._spec(DOMAIN_ROWS), **spec}, open=True, create=True, assume_metadata=True,
                             context=ts.Context({**READ_CONTEXT, **context})).result()
            for s in range(0, len(firsts), 1000):
                handle[firsts[s:s + 1000]].read().result()
            cold, warm = time_gathers(lambda r, h=handle: h[r].read().result(), gathers())
            times.setdefault(name, {"cold": [], "warm": [], "rounds": []})
            times[name]["cold"] += cold
            times[name]["warm"] += warm
            times[name]["rounds"].append(statistics.median(cold))
            print(f"{name}: cold p50 {statistics.median(cold):.2f} ms, warm p50 {statistics.median(warm):.2f} ms",
                  flush=True)
        plain = PlainReads(rows, np.unique(live // rows.shard_rows).tolist())
        cold, warm = time_gathers(plain, gathers())
        plain.close()
        times.setdefault("pread", {"cold": [], "warm": [], "rounds": []})
        times["pread"]["cold"] += cold
        times["pread"]["warm"] += warm
        times["pread"]["rounds"].append(statistics.median(cold))
        print(f"pread: cold p50 {statistics.median(cold):.2f} ms, warm p50 {statistics.median(warm):.2f} ms",
              flush=True)
    out = {"command": f"python -m benchmarks.gather_cache --rows {args.rows} --repeats {args.repeats} "
                      f"--rounds {args.rounds}",
           "rows": args.rows, "page_cache_dropped": drop_page_cache(),
           "cold_p50_ms": {k: statistics.median(v["cold"]) for k, v in times.items()},
           "cold_p90_ms": {k: float(np.percentile(v["cold"], 90)) for k, v in times.items()},
           "warm_p50_ms": {k: statistics.median(v["warm"]) for k, v in times.items()},
           "cold_p50_ms_per_round": {k: v["rounds"] for k, v in times.items()}}
    shutil.rmtree(args.dir)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

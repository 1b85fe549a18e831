"""Token gathers at scale: the Zarr token store the engine reads against 0.2's .npy segments.

For each token dtype (float16, int8 with a scale per token), an index of ``--rows`` rows of
64 x 384 tokens is built through ``Engine.add_embeddings`` in commits of ``--batch`` rows (each
commit timed), then 100 random live rows are gathered ``--repeats`` times through
``IndexStore.tokens.read`` (what a rerank reads: the stored values, for int8 with their scales)
and the median is reported: first right after the store is opened
(``gather_100_p50_ms_first_after_open``: shard indexes are read as the gathers meet them), then,
after one row of every shard was read, with other random rows (``gather_100_p50_ms``: the steady
state of a serving process, which keeps every shard index in memory; the rows themselves still
come from disk), and the same with the cast to the float32 tensor the reranker takes
(``gather_100_to_float32_tensor_p50_ms``, ranking.float_tensor). In the same run the same rows
are written as 0.2 wrote them (one .npy file per commit; for int8 a second file of scales) and
gathered as 0.2 read them (a numpy memory map per file, fancy indexing), so
the ratio is honest. The two copies are built one after the other and deleted as soon as they
are measured, so the disk needs room for one copy only (49 GB for float16 at 1M rows).

Token values are random rows from a pool with each row's number written into it: a gather
that returned the wrong row would be caught, and making the data costs a copy, not a random
number generator per value. Bytes per image are the files' sizes on disk over the rows.

    python -m benchmarks.token_gather --rows 1000000 --dir /work/bench-tmp
    python -m benchmarks.token_gather --rows 100000 --dir /tmp/g --out /tmp/g.json   # a quicker look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edje_search.config import IndexConfig
from edje_search.engine import Engine
from edje_search.storage.index_store import IndexStore
from edje_search.ranking import float_tensor
from edje_search.storage.token_store import StoredTokens, bytes_per_image, dequantize, quantize_per_token

RESULTS = Path(__file__).parent / "results" / "token_gather.json"
M, D, DIM = 64, 384, 32


class Rows:
    """Deterministic token rows: a pool of random rows, each stamped with its row number."""

    def __init__(self, pool: int = 512, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pool = (rng.standard_normal((pool, M, D)) * rng.uniform(0.2, 3, (pool, M, 1))).astype(np.float16)

    def batch(self, start: int, n: int) -> np.ndarray:
        idx = np.arange(start, start + n)
        out = self.pool[idx % len(self.pool)]
        out[:, 0, 0] = (idx % 2048).astype(np.float16)  # exactly representable in float16
        return out

    def vectors(self, start: int, n: int) -> np.ndarray:
        v = np.random.default_rng(start).standard_normal((n, DIM)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def p50_ms(fn, rows_of, repeats: int) -> float:
    fn(rows_of(-1))
    times = []
    for i in range(repeats):
        rows = rows_of(i)
        t = time.perf_counter()
        fn(rows)
        times.append(1000 * (time.perf_counter() - t))
    return float(statistics.median(times))


def build_zarr(path: Path, dtype: str, rows: Rows, n: int, batch: int,
               scale_chunk_rows: int = 0) -> tuple[IndexStore, list[float]]:
    cfg = IndexConfig(dim=DIM, tokens_per_image=M, token_width=D, token_dtype=dtype, factory="Flat",
                      token_scale_chunk_rows=scale_chunk_rows, model_path="(synthetic: vectors given)",
                      model_fingerprint="synthetic")
    engine = Engine(IndexStore.create(path, cfg), model=None)  # add_embeddings needs no model
    commit_s = []
    for s in range(0, n, batch):
        b = min(batch, n - s)
        t = time.perf_counter()
        engine.add_embeddings([f"/img/{i:08d}.jpg" for i in range(s, s + b)], rows.vectors(s, b),
                              rows.batch(s, b), optimize=False)
        commit_s.append(time.perf_counter() - t)
        if len(commit_s) % 10 == 0:
            print(f"  zarr {dtype}: {s + b} rows, last commit {commit_s[-1]:.2f} s", flush=True)
    return IndexStore.open(path), commit_s


class NpySegments:
    """0.2's layout and gather: one .npy per commit, memory-mapped, fancy-indexed per file."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype, self.starts, self.maps = path, dtype, [], {}
        (path / "tokens").mkdir(parents=True)
        if dtype == "int8":
            (path / "token_scales").mkdir()

    def write(self, start: int, tokens: np.ndarray) -> None:
        name = f"{start:012d}.npy"
        if self.dtype == "int8":
            q, scale = quantize_per_token(tokens)
            np.save(self.path / "tokens" / name, q)
            np.save(self.path / "token_scales" / name, scale)
        else:
            np.save(self.path / "tokens" / name, tokens)
        self.starts.append(start)

    def _map(self, kind: str, start: int):
        key = (kind, start)
        if key not in self.maps:
            self.maps[key] = np.load(self.path / kind / f"{start:012d}.npy", mmap_mode="r")
        return self.maps[key]

    def _gather(self, kind: str, idx: np.ndarray, shape, dtype) -> np.ndarray:
        seg = np.searchsorted(np.asarray(self.starts), idx, side="right") - 1
        out = np.empty((len(idx), *shape), dtype=dtype)
        for si in np.unique(seg).tolist():
            sel = np.nonzero(seg == si)[0]
            start = self.starts[si]
            out[sel] = self._map(kind, start)[idx[sel] - start]
        return out

    def read(self, rows) -> StoredTokens:
        idx = np.asarray(rows, dtype=np.int64)
        if self.dtype == "int8":
            return StoredTokens(self._gather("tokens", idx, (M, D), np.int8),
                                self._gather("token_scales", idx, (M, 1), np.float16))
        return StoredTokens(self._gather("tokens", idx, (M, D), np.float16))


def measure(dtype: str, args, rows: Rows) -> dict:
    out: dict = {"dtype": dtype}
    zdir, ndir = args.dir / f"zarr-{dtype}", args.dir / f"npy-{dtype}"
    for d in (zdir, ndir):
        shutil.rmtree(d, ignore_errors=True)
    store, commit_s = build_zarr(zdir, dtype, rows, args.rows, args.batch, args.scale_chunk_rows)
    out["scale_chunk_rows"] = store.config.scale_chunk_rows if dtype == "int8" else None
    live = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    order = {int(r): i for i, r in enumerate(live)}  # row -> its position among the rows added
    pick = np.random.default_rng(1)
    choices = [pick.choice(live, 100, replace=False) for _ in range(args.repeats + 1)]
    got = store.tokens.read(choices[0]).dequantized()
    want = np.concatenate([rows.batch(order[int(r)], 1) for r in choices[0]])
    if dtype == "int8":
        want = dequantize(*quantize_per_token(want))
    assert np.array_equal(got, want), "the gather returned other rows"
    tokens_bytes = disk_bytes(zdir / "tokens.zarr")
    after_open = p50_ms(store.tokens.read, lambda i: choices[i + 1], args.repeats)
    # a serving process soon holds every shard index (16 bytes a row); touch each shard once to get
    # there, then time fresh random rows (the page cache holds only what fits of the store: at 1M
    # float16 rows, less than half of it on a 23 GiB machine)
    shards = np.unique(live // store.tokens.shard_rows, return_index=True)[1]
    for s in range(0, len(shards), 1000):
        store.tokens.read(live[shards[s:s + 1000]])
    steady = [pick.choice(live, 100, replace=False) for _ in range(2 * args.repeats + 2)]
    out["zarr"] = {
        "gather_100_p50_ms": p50_ms(store.tokens.read, lambda i: steady[i + 1], args.repeats),
        "gather_100_p50_ms_first_after_open": after_open,
        "gather_100_to_float32_tensor_p50_ms": p50_ms(lambda r: float_tensor(store.tokens.read(r)),
                                                      lambda i: steady[args.repeats + i + 2], args.repeats),
        "bytes_per_image": tokens_bytes / args.rows,
        "commit_s": {"first": commit_s[0], "last": commit_s[-1], "median": statistics.median(commit_s),
                     "last_over_first": commit_s[-1] / commit_s[0]},
        "rows_spanned": store.n_rows,
    }
    print(f"  zarr {dtype}: {out['zarr']}", flush=True)
    shutil.rmtree(zdir)
    npy = NpySegments(ndir, dtype)
    positions = [np.array([order[int(r)] for r in c]) for c in choices]  # 0.2 numbered rows densely
    for s in range(0, args.rows, args.batch):
        npy.write(s, rows.batch(s, min(args.batch, args.rows - s)))
    out["npy_0.2"] = {"gather_100_p50_ms": p50_ms(npy.read, lambda i: positions[i + 1], args.repeats),
                      "bytes_per_image": disk_bytes(ndir) / args.rows}
    print(f"  npy {dtype}: {out['npy_0.2']}", flush=True)
    shutil.rmtree(ndir)
    out["zarr_over_npy_gather"] = out["zarr"]["gather_100_p50_ms"] / out["npy_0.2"]["gather_100_p50_ms"]
    out["raw_bytes_per_image"] = bytes_per_image(M, D, dtype)
    out["zarr_bytes_over_raw"] = out["zarr"]["bytes_per_image"] / out["raw_bytes_per_image"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8"])
    ap.add_argument("--dir", type=Path, required=True, help="scratch folder (needs 50 GB free at 1M float16 rows)")
    ap.add_argument("--scale-chunk-rows", type=int, default=0,
                    help="int8 scales per inner chunk: 0 = a whole shard, as new indexes store them; 1 = one "
                         "row per chunk, as int8 indexes made before did")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = Rows()
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 2**20
    results = {"command": "python -m benchmarks.token_gather " + " ".join(sys.argv[1:]),
               "rows": args.rows, "batch": args.batch, "token_shape": [M, D], "cpu_count": os.cpu_count(),
               "ram_gb": round(mem_gb, 1), "by_dtype": [measure(dtype, args, rows) for dtype in args.dtypes]}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

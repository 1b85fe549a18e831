"""Does a codec pay for stored tokens? Size and gather time, side by side, on trained tokens.

The tokens are the demo model's own (an index built by `make demo`), stored as float16 and as
int8 with one scale per token, each in a sharded Zarr v3 array laid out as the index lays it out
(one row per inner chunk, CRC-32C per row), with no codec and with zstd and blosc (byte shuffle)
between the bytes and the checksum. Reported per codec: stored bytes per image (shard index
included) against the raw row, and the median time to gather 100 random rows through
tensorstore (files in the page cache: the codec's own cost).

    python -m benchmarks.token_codecs --index indexes/demo --out benchmarks/results/token_codecs.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edje_search.storage.token_store import quantize_per_token
from edje_search.storage.zarr_io import array_metadata

CODECS = {
    "none": None,
    "zstd-3": {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
    "zstd-9": {"name": "zstd", "configuration": {"level": 9, "checksum": False}},
    "blosc-zstd-shuffle": {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": "shuffle",
                                                               "typesize": 2, "blocksize": 0}},
    "blosc-lz4-shuffle": {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle",
                                                              "typesize": 2, "blocksize": 0}},
}


def load_tokens(index: Path) -> np.ndarray:
    """Every stored token row of an index, whichever layout it has."""
    zarr_dir = index / "tokens.zarr" / "tokens"
    if zarr_dir.is_dir():
        from edje_search.storage.index_store import IndexStore

        store = IndexStore.open(index)
        return np.asarray(store.tokens.get([e.row for e in store.entries]), dtype=np.float16)
    return np.concatenate([np.load(p) for p in sorted((index / "tokens").glob("*.npy"))]).astype(np.float16)


def write_array(path: Path, rows: np.ndarray, compressor: dict | None, shard_rows: int = 256):
    import tensorstore as ts

    meta = array_metadata(rows.shape[1:], rows.dtype, shard_rows, len(rows), compressor=compressor)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path) + "/"},
            "metadata": {k: v for k, v in meta.items() if k not in ("zarr_format", "node_type", "attributes")}}
    if compressor and compressor["name"] == "blosc":
        spec["metadata"]["codecs"][0]["configuration"]["codecs"][1]["configuration"]["typesize"] = rows.dtype.itemsize
    arr = ts.open(spec, create=True).result()
    arr[:].write(rows).result()
    return arr


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def gather_p50_ms(read, n_rows: int, k: int = 100, repeats: int = 200, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    read(rng.choice(n_rows, k, replace=False))  # warm the page cache
    times = []
    for _ in range(repeats):
        rows = rng.choice(n_rows, k, replace=False)
        t = time.perf_counter()
        read(rows)
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))


def zarr_python_reader(path: Path):
    """The same array read through zarr-python's codec pipeline (orthogonal indexing wants
    sorted rows: gather once, restore the asked order)."""
    import zarr

    arr = zarr.open_array(str(path), mode="r")

    def read(rows):
        uniq, inverse = np.unique(rows, return_inverse=True)
        return np.asarray(arr.oindex[uniq])[inverse]
    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True, help="an index built with a trained model")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "token_codecs.json")
    args = ap.parse_args()
    tokens = load_tokens(args.index)
    q, scale = quantize_per_token(tokens)
    stores = {"float16": tokens, "int8 tokens": q, "int8 scales": scale}
    results = []
    work = Path(tempfile.mkdtemp(prefix="token-codecs-"))
    try:
        for name, codec in CODECS.items():
            for what, rows in stores.items():
                path = work / f"{name}-{what.replace(' ', '_')}"
                arr = write_array(path, rows, codec)
                raw = rows[0].nbytes
                size = stored_bytes(path) / len(rows)
                results.append({"codec": name, "array": what, "raw_bytes_per_row": raw,
                                "stored_bytes_per_row": round(size, 1), "ratio": round(size / raw, 4),
                                "gather_100_p50_ms": round(gather_p50_ms(
                                    lambda r, arr=arr: arr[r].read().result(), len(rows)), 3)})
                if codec is None:  # the same array through zarr-python's own codec pipeline
                    results[-1]["zarr_python_gather_100_p50_ms"] = round(gather_p50_ms(
                        zarr_python_reader(path), len(rows), repeats=30), 3)
                print(json.dumps(results[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"command": f"python -m benchmarks.token_codecs --index {args.index}",
           "index": str(args.index), "rows": int(len(tokens)), "token_shape": list(tokens.shape[1:]),
           "cpu_count": os.cpu_count(), "results": results}
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

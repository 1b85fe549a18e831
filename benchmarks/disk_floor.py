"""The disk's own floor for a cold token gather: 100 random row-sized reads, no format at all.

Writes ``--gb`` of rows of ``--row-bytes`` (49,152: 64 x 384 float16) to a scratch file, drops
the page cache (needs root: ``/proc/sys/vm/drop_caches``) before each setting, and times 100
random ``os.pread`` of one row each with 1, 8 and 32 threads in flight. A store whose gather
is not cached cannot beat this; benchmarks/token_gather.py gives what the engine achieves.

    python -m benchmarks.disk_floor --dir /work/bench-tmp --out benchmarks/results/disk_floor.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def drop_page_cache() -> bool:
    done = subprocess.run("sync; echo 1 > /proc/sys/vm/drop_caches", shell=True, capture_output=True)
    return done.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--row-bytes", type=int, default=49_152)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "disk_floor.json")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "disk_floor.bin"
    n_rows = int(args.gb * 2**30) // args.row_bytes
    block = np.random.default_rng(0).integers(0, 255, 256 * args.row_bytes, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(0, n_rows, 256):
            f.write(block)
    fd = os.open(path, os.O_RDONLY)
    rng = np.random.default_rng(1)
    results = {"command": f"python -m benchmarks.disk_floor --gb {args.gb}", "file_gb": args.gb,
               "row_bytes": args.row_bytes, "rows": n_rows, "cache_dropped": drop_page_cache(), "p50_ms": {}}
    try:
        for workers in (1, 8, 32):
            drop_page_cache()
            pool, times = ThreadPoolExecutor(workers), []
            for _ in range(args.repeats):
                offsets = (rng.integers(0, n_rows, 100) * args.row_bytes).tolist()
                t = time.perf_counter()
                list(pool.map(lambda off: os.pread(fd, args.row_bytes, off), offsets))
                times.append(1000 * (time.perf_counter() - t))
            pool.shutdown()
            results["p50_ms"][f"{workers} in flight"] = statistics.median(times)
            print(workers, "in flight:", round(statistics.median(times), 2), "ms", flush=True)
    finally:
        os.close(fd)
        path.unlink()
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

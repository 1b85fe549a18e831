"""Timing helpers: warm-up, repeats, medians, and a description of the machine."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
                   sync: Callable[[], object] | None = None) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup``; ``sync`` (e.g. a CUDA
    synchronise) runs before the clock starts and before it stops, so queued device work counts."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}

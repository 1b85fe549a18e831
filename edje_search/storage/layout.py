"""Names inside an index directory, and the crash points of a commit.

Shared by the store and the modules that maintain it (compaction, integrity), so that none of
them has to import another for a file name.
"""
from __future__ import annotations

import os

CONFIG_FILE = "index.json"
SKIPPED_FILE = "skipped.jsonl"
FAISS_DIR = "faiss"
REFINE_FACTOR = 4  # candidates per wanted hit that lossy FAISS recipes re-score exactly


def fault(point: str) -> None:
    """Deterministic crash injection for the crash-safety tests: EDJE_FAULT=<point> kills the
    process (as kill -9 would: no cleanup, no flush) when a commit reaches ``point``."""
    if os.environ.get("EDJE_FAULT") == point:
        os._exit(137)

"""Checking the manifest against itself and against the files it names, and restoring it.

SQLite checksums nothing in a database page, so a changed byte in a stored path goes unseen by
ordinary queries; what does see it is ``PRAGMA integrity_check`` (a row whose index entries no
longer match it) and two cross-checks made here: no path is live twice, and a file whose size
and mtime still match what was recorded when it was indexed still has the recorded SHA-256 (a
mismatch means the manifest, not the file, changed). Hashing is bounded to a fixed sample of
``HASH_SAMPLE`` rows so that ``verify`` stays quick on large indexes; ``repair`` checks them all.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from typing import TYPE_CHECKING

from .manifest import ManifestCheck

if TYPE_CHECKING:
    from .index_store import IndexStore

HASH_SAMPLE = 1000


def _sha256_of(path: bytes) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _unchanged(path: bytes, size: int, mtime_ns: int) -> bool:
    """The file is there with the size and mtime recorded when it was indexed."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return size >= 0 and st.st_size == size and st.st_mtime_ns == mtime_ns


def _sample(rows: list, limit: int | None) -> list:
    if limit is None or len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def wrong_content(rows: list, limit: int | None = HASH_SAMPLE) -> list[int]:
    """Rows whose file is unchanged by size and mtime but does not hold the recorded content."""
    return [r for r, p, sha, size, mtime in _sample(rows, limit)
            if sha and _unchanged(p, size, mtime) and _sha256_of(p) not in (None, sha)]


def duplicate_paths(rows: list) -> dict[bytes, list[tuple]]:
    groups: dict[bytes, list[tuple]] = defaultdict(list)
    for item in rows:
        groups[item[1]].append(item)
    return {p: g for p, g in groups.items() if len(g) > 1}


def gone_files(store: IndexStore) -> list[tuple[int, str]]:
    """(row, path) of live rows whose image file is no longer on disk: not damage to the index
    (the next build drops them), but queries would return them."""
    return [(r, os.fsdecode(p)) for r, p, *_ in ManifestCheck(store.manifest).live_rows_by_scan()
            if not os.path.lexists(p)]


def manifest_problems(store: IndexStore) -> list[str]:
    """SQLite's integrity check, duplicate live paths and a sample of paths against their content."""
    check = ManifestCheck(store.manifest)
    problems = []
    bad = check.integrity_check()
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        problems.append(f"manifest {store.manifest.path} fails SQLite's integrity check: {bad[0]}{more}")
    rows = check.live_rows_by_scan()
    for path, group in duplicate_paths(rows).items():
        problems.append(f"manifest names {os.fsdecode(path)} for {len(group)} live rows "
                        f"({', '.join(str(g[0]) for g in group)})")
    for r in wrong_content(rows):
        problems.append(f"manifest row {r}: its path holds other content than the row was indexed from "
                        f"(the manifest's path was changed)")
    return problems


def restore(store: IndexStore) -> tuple[set[int], list[str]]:
    """Rows to drop so that the manifest is consistent again, and what was done.

    A row whose path is live twice keeps only the row whose recorded content the file holds;
    a row whose unchanged file holds other content is dropped. What such a row named before is
    recorded nowhere else, so it cannot be restored: it is dropped and its file is embedded
    again by the next build. When SQLite's check fails the secondary indexes are dropped here
    and rebuilt from the table after the repair commit (:func:`rebuild`).
    """
    check = ManifestCheck(store.manifest)
    notes: list[str] = []
    damaged = check.integrity_check()
    if damaged:
        check.drop_indexes()
        notes.append(f"manifest failed SQLite's integrity check ({damaged[0]}): indexes rebuilt from its rows")
    rows = check.live_rows_by_scan()
    drop: set[int] = set(wrong_content(rows, limit=None))
    for path, group in duplicate_paths(rows).items():
        actual = _sha256_of(path)
        keep = [g[0] for g in group if g[2] == actual and g[0] not in drop][:1]
        drop.update(g[0] for g in group if g[0] not in keep)
    if drop:
        notes.append(f"{len(drop)} manifest rows name a file that does not hold their content "
                     f"(rows {sorted(drop)[:8]}): their original paths cannot be restored, so they are dropped")
    return drop, notes


def rebuild(store: IndexStore) -> list[str]:
    """Build the secondary indexes again and check the result; returns what is still wrong."""
    check = ManifestCheck(store.manifest)
    check.rebuild_indexes()
    return [f"manifest still fails SQLite's integrity check after repair: {p}" for p in check.integrity_check()]

"""Checking an index against itself, and repairing what can be rebuilt from what is stored.

:func:`verify` needs no model: every vector and token segment present and of the right length,
the manifest's row counts, and FAISS against the stored vectors row by row (ids always; the
vectors too where the FAISS codes are exact floats). :func:`repair` turns unreadable segments
into dropped rows (listed, so the next build embeds those files again) and rebuilds FAISS from
the stored vectors, in one commit.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import TYPE_CHECKING

import numpy as np

from ..errors import IndexCorrupt
from . import compaction, vector_index
from .layout import CONFIG_FILE, FAISS_DIR
from .manifest import Snapshot

if TYPE_CHECKING:
    from .index_store import IndexStore

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RepairReport:
    dropped: list[str] = dataclasses.field(default_factory=list)  # paths whose rows were unreadable
    rebuilt_faiss: bool = False
    removed_files: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.dropped)} unreadable rows dropped (re-run build-index to embed them again), "
                f"FAISS {'rebuilt from the stored vectors' if self.rebuilt_faiss else 'intact'}, "
                f"{len(self.removed_files)} stray files removed")


def verify(store: IndexStore) -> list[str]:
    """Every check that needs no model: manifest against FAISS and the stored vectors for every
    row, every vector and token segment present and of the right length. [] = healthy."""
    problems = []
    for arr in [store.vector_array, *store.tokens.arrays.values()]:
        for start, count in arr.segments:
            try:
                arr.check_segment(start, count)
            except IndexCorrupt as e:
                problems.append(str(e).split(" (run")[0])
    max_row, live = store.manifest.count_rows()
    if max_row > store.n_rows:
        problems.append(f"manifest names rows up to {max_row - 1}, only {store.n_rows} are committed")
    if live != len(store):
        problems.append(f"manifest has {live} live rows, its state says {len(store)}")
    dead = set(store.tombstones.tolist())
    seen = np.zeros(store.n_rows, dtype=bool)
    for name, _recipe, first, end in store.snapshot.faiss_segments:
        index = store.faiss_files[name]
        ids = vector_index.segment_ids(index)
        if ids.size and (ids.min() < first or ids.max() >= end):
            problems.append(f"FAISS segment {name} holds rows outside [{first}, {end})")
            continue
        if np.any(seen[ids]):
            problems.append(f"FAISS segment {name} repeats rows held by another segment")
        seen[ids] = True
        problems += compare_codes(store, name, index)
    live_rows = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    missing = live_rows[~seen[live_rows]] if live_rows.size else live_rows
    if missing.size:
        problems.append(f"{missing.size} live rows are missing from FAISS (first: {missing[:5].tolist()})")
    extra = np.nonzero(seen)[0]
    extra = extra[~np.isin(extra, live_rows)]
    extra = [r for r in extra.tolist() if r not in dead]
    if extra:
        problems.append(f"FAISS holds {len(extra)} rows the manifest does not list (first: {extra[:5]})")
    return problems


def compare_codes(store: IndexStore, name: str, index) -> list[str]:
    """Stored vectors against what FAISS holds, for every row, where the codes are exact floats."""
    try:
        got = vector_index.exact_contents(index, store.config.dim)
        if got is None:
            return []  # lossy codes (PQ, SQ) or a graph: ids were checked, vectors cannot be compared exactly
        ids, held = got
        if not ids.size:
            return []
        stored = store.vectors(ids)
    except IndexCorrupt as e:
        return [str(e).split(" (run")[0]]
    if not np.allclose(stored, held, atol=1e-5):
        bad = ids[~np.all(np.isclose(stored, held, atol=1e-5), axis=1)]
        return [f"FAISS vectors differ from the stored embeddings for {bad.size} rows "
                f"(first: {bad[:5].tolist()}) in {name}"]
    return []


def repair(store: IndexStore) -> RepairReport:
    """Drop rows whose vectors or tokens are unreadable (listed, so build-index embeds them
    again), rebuild FAISS from the stored vectors, remove stray files. One commit: a reader
    sees the damaged generation or the repaired one, never one without FAISS."""
    store.require_lock(repairing=True)
    report = RepairReport()
    snap = store.manifest.snapshot()
    store.snapshot = snap
    arrays = {"vectors": store.vector_array, **store.tokens.arrays}
    check_config_against_segments(store, arrays, snap)
    lost: list[tuple[int, int]] = []
    replaced: list[tuple[str, int, int]] = []
    for kind, arr in arrays.items():
        arr.set_segments(snap.segments.get(kind, ()))
        for start, count in arr.segments:
            try:
                arr.check_segment(start, count)
            except IndexCorrupt:
                lost.append((start, count))
    for start, count in sorted(set(lost)):
        for kind, arr in arrays.items():  # keep the rows tiled: an unreadable range becomes zeros, never live
            if (start, count) in arr.segments:
                arr.write_segment(start, np.zeros((count, *arr.row_shape), arr.dtype))
                replaced.append((kind, start, count))
    dead_rows = [e.row for e in store.manifest.iter_live(snap.generation)
                 if any(s <= e.row < s + n for s, n in lost)]
    report.dropped = sorted(store.manifest.paths_of_rows(dead_rows, snap.generation).values())
    store.tombstones = np.union1d(store.tombstones, np.asarray(dead_rows, dtype=np.int64))
    n_live = len(store) - len(dead_rows)
    target = store.config.factory if store.config.factory != vector_index.AUTO else \
        vector_index.choose_recipe(n_live, store.config.dim)
    if vector_index.training_rows(target) > n_live:
        target = "Flat"
    report.removed_files = remove_stray_files(store)  # debris of crashed commits, before writing anew
    faiss_list, settings, _ = compaction.encode_all(store, target, exclude=dead_rows)
    store.manifest.commit(generation=snap.generation + 1, n_rows=snap.n_rows, removed=dead_rows,
                         add_segments=replaced, faiss_segments=faiss_list, settings=settings)
    store.faiss_files = {}
    store.adopt(store.manifest.snapshot())
    remove_stray_files(store)  # the FAISS files this commit replaced
    report.rebuilt_faiss = True
    logger.info("repair: %s", report.summary())
    return report


def check_config_against_segments(store: IndexStore, arrays: dict, snap: Snapshot) -> None:
    """Refuse to repair when index.json, not the data, is what changed: if every segment of a
    store is readable but of another row shape than the config implies, dropping its rows
    would destroy an intact index."""
    for kind, arr in arrays.items():
        problems = []
        for start, count in snap.segments.get(kind, []):
            try:
                arr.check_segment(start, count)
            except IndexCorrupt as e:
                problems.append(str(e))
            else:
                break  # one segment agrees with the config: for this store the config is right
        else:
            if problems and all(" holds rows of shape " in m for m in problems):
                raise IndexCorrupt(f"{CONFIG_FILE} disagrees with every stored {kind} segment "
                                   f"({problems[0].split(' (run')[0]}); restore {CONFIG_FILE} instead of repairing")


def remove_stray_files(store: IndexStore) -> list[str]:
    """Delete files that no committed generation names: what a crashed commit or creation left
    behind, and FAISS files a commit replaced. Run by every writer as it takes the lock."""
    removed = []
    for arr in [store.vector_array, *store.tokens.arrays.values()]:
        removed += arr.remove_stray_files()
    keep = set(store.faiss_files) | {store.settings.get("template", "")}
    for p in (store.directory / FAISS_DIR).iterdir():
        if p.name not in keep:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    for p in store.directory.glob(f".{store.directory.name}.*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed

"""Checking an index against itself, and repairing what can be rebuilt from what is stored.

:func:`verify` needs no model: every vector and token segment present, of the right length,
matching the checksums recorded when it was committed and free of NaN/inf (checksums.py); the
manifest's own integrity and row counts; and FAISS against the stored vectors row by row (ids
always; the vectors too where the FAISS codes are exact floats). :func:`repair` turns damaged
rows (unreadable segments, rows failing their checksum or holding NaN) into dropped rows
(listed, so the next build embeds those files again) and rebuilds FAISS from the stored vectors
that pass their checks, in one commit.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import TYPE_CHECKING

import numpy as np

from ..errors import IndexCorrupt, StorageUnavailable
from . import checksums, compaction, manifest_check, migrate, vector_index
from .layout import CONFIG_FILE, FAISS_DIR

if TYPE_CHECKING:
    from .index_store import IndexStore

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RepairReport:
    dropped: list[str] = dataclasses.field(default_factory=list)  # paths whose rows were damaged or unreadable
    damaged: list[str] = dataclasses.field(default_factory=list)  # the damaged segments, as verify names them
    manifest: list[str] = dataclasses.field(default_factory=list)  # what was restored in the manifest, or not
    rebuilt_faiss: bool = False
    removed_files: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.dropped)} damaged rows dropped (re-run build-index to embed them again), "
                f"FAISS {'rebuilt from the stored vectors' if self.rebuilt_faiss else 'intact'}, "
                f"{len(self.removed_files)} stray files removed")


def verify(store: IndexStore) -> list[str]:
    """Every check that needs no model: every vector and token segment present, of the right
    length, matching its checksums and free of NaN/inf; the manifest's own integrity
    (manifest_check.py); the manifest against FAISS and the stored vectors for every row.
    [] = healthy."""
    problems = [d.message() for d in segment_damage(store)] + manifest_check.manifest_problems(store)
    max_row, live = store.manifest.count_rows()
    if max_row > store.n_rows:
        problems.append(f"manifest names rows up to {max_row - 1}, only {store.n_rows} are committed")
    if live != len(store):
        problems.append(f"manifest has {live} live rows, its state says {len(store)}")
    dead = set(store.tombstones.tolist())
    seen = np.zeros(store.n_rows, dtype=bool)
    unknown = np.zeros(store.n_rows, dtype=bool)  # rows of FAISS files a writer could not load
    problems += [m.split(" (run")[0] for m in store.damaged_faiss]
    for name, _recipe, first, end in store.snapshot.faiss_segments:
        index = store.faiss_files.get(name)
        if index is None:
            unknown[first:end] = True
            continue
        ids = vector_index.segment_ids(index)
        if ids.size and (ids.min() < first or ids.max() >= end):
            problems.append(f"FAISS segment {name} holds rows outside [{first}, {end})")
            continue
        if np.any(seen[ids]):
            problems.append(f"FAISS segment {name} repeats rows held by another segment")
        seen[ids] = True
        problems += compare_codes(store, name, index)
    live_rows = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    missing = live_rows[~(seen | unknown)[live_rows]] if live_rows.size else live_rows
    if missing.size:
        problems.append(f"{missing.size} live rows are missing from FAISS (first: {missing[:5].tolist()})")
    extra = np.nonzero(seen)[0]
    extra = extra[~np.isin(extra, live_rows)]
    extra = [r for r in extra.tolist() if r not in dead]
    if extra:
        problems.append(f"FAISS holds {len(extra)} rows the manifest does not list (first: {extra[:5]})")
    return problems


def segment_damage(store: IndexStore) -> list[checksums.SegmentDamage]:
    """Every damaged vector or token segment of the store's generation (checksums.py)."""
    records = store.manifest.segment_checksums()
    store.tokens.reopen()  # read the stored bytes, not what this process cached of them
    found = []
    for kind, arr in store.arrays.items():
        for start, count in arr.segments:
            damage = checksums.check_segment(kind, arr, start, count, records.get((kind, start)))
            if damage is not None:
                found.append(damage)
    return found


def unchecked_segments(store: IndexStore) -> list[str]:
    """Segment files committed without checksums (before they were recorded): read and scanned
    for NaN by verify, but a changed byte in them cannot be told from a stored one."""
    records = store.manifest.segment_checksums()
    return [arr.path_of(s) for kind, arr in store.arrays.items() for s, _n in arr.segments
            if (kind, s) not in records]


def compare_codes(store: IndexStore, name: str, index) -> list[str]:
    """Stored vectors against what FAISS holds, for every row, where the codes are exact floats."""
    try:
        bad = differing_rows(store, index)
    except StorageUnavailable:
        raise  # not a problem of the index: verify stops
    except IndexCorrupt as e:
        return [str(e).split(" (run")[0]]
    if bad.size:
        return [f"FAISS vectors differ from the stored embeddings for {bad.size} rows "
                f"(first: {bad[:5].tolist()}) in {name}"]
    return []


def differing_rows(store: IndexStore, index) -> np.ndarray:
    """Rows whose stored vector differs from the one FAISS holds (none where the codes are lossy)."""
    got = vector_index.exact_contents(index, store.config.dim)
    if got is None or not got[0].size:
        return np.zeros(0, dtype=np.int64)  # lossy codes (PQ, SQ) or a graph: ids are checked elsewhere
    ids, held = got
    stored = store.vectors(ids)
    return ids[~np.all(np.isclose(stored, held, atol=1e-5), axis=1)]


def unverifiable_vectors(store: IndexStore, damaged: set[int]) -> set[int]:
    """Rows of unchecked vector segments whose stored vector and FAISS's disagree: with no
    checksum to say which copy changed, neither is trusted and the row is dropped (re-embedded
    by the next build) rather than FAISS being rebuilt from a vector that may be the damaged one."""
    records = store.manifest.segment_checksums()
    unchecked = [(s, n) for s, n in store.vector_array.segments if ("vectors", s) not in records]
    if not unchecked:
        return set()
    out: set[int] = set()
    for index in store.faiss_files.values():
        try:
            bad = differing_rows(store, index)
        except StorageUnavailable:
            raise
        except IndexCorrupt:
            continue  # an unreadable vector segment: its rows are already in ``damaged``
        out.update(r for r in bad.tolist() if r not in damaged and any(s <= r < s + n for s, n in unchecked))
    return out


def repair(store: IndexStore) -> RepairReport:
    """Drop rows whose vectors or tokens are unreadable, fail their checksum or hold NaN, and
    manifest rows that lost their path (listed, so build-index embeds those files again);
    rebuild FAISS from the stored vectors of the rows left; remove stray files. One commit: a
    reader sees the damaged generation or the repaired one, never one without FAISS."""
    store.require_lock(repairing=True)
    report = RepairReport()
    snap = store.manifest.snapshot()
    store.snapshot = snap
    arrays = store.arrays  # index.json was checked against them when the writer took the lock
    for kind, arr in arrays.items():
        arr.set_segments(snap.segments.get(kind, ()))
    damage = segment_damage(store)
    replaced: list[tuple[str, int, int]] = []
    lost_rows: set[int] = set()
    by_kind: dict[str, tuple[set[int], list[int]]] = {}
    for d in damage:
        lost_rows.update(d.rows)
        rows, starts = by_kind.setdefault(d.kind, (set(), []))
        rows.update(d.rows)
        starts.append(d.start)
        report.damaged.append(d.message())
    for kind, (rows, starts) in by_kind.items():
        # keep every intact row where it is: the damaged ones are written again as zeros (never
        # live again), under new checksums
        replaced += [(kind, s, n) for s, n in arrays[kind].rewrite_rows(sorted(rows), starts)]
    lost_rows |= unverifiable_vectors(store, lost_rows)
    wrong_rows, report.manifest = manifest_check.restore(store)
    lost_rows |= wrong_rows
    dead_rows = [e.row for e in store.manifest.iter_live(snap.generation) if e.row in lost_rows]
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
                         add_segments=replaced, faiss_segments=faiss_list, settings=settings,
                         checksums=checksums.written_checksums(store.arrays, replaced))
    report.manifest += manifest_check.rebuild(store)
    store.faiss_files = {}
    store.adopt(store.manifest.snapshot())
    remove_stray_files(store)  # the FAISS files this commit replaced
    report.rebuilt_faiss = True
    logger.info("repair: %s", report.summary())
    return report


def check_config_against_segments(store: IndexStore) -> None:
    """Refuse to write (repair included) when index.json, not the data, is what changed: if the
    stored rows are of another layout than the config implies, repair would drop them all and
    stray-file removal would delete files of the other layout, destroying an intact index."""
    for kind, arr in store.arrays.items():
        wrong = arr.layout_mismatch(store.snapshot.segments.get(kind, []))
        if wrong:
            raise IndexCorrupt(f"{CONFIG_FILE} disagrees with the stored {kind} ({wrong}); restore "
                               f"{CONFIG_FILE} instead of repairing")


def remove_stray_files(store: IndexStore) -> list[str]:
    """Delete files that no committed generation names: what a crashed commit or creation left
    behind, and FAISS files a commit replaced. Run by every writer as it takes the lock."""
    removed = []
    for arr in [store.vector_array, *store.tokens.arrays.values()]:
        removed += arr.remove_stray_files()
    removed += migrate.remove_legacy_tokens(store.config.store_url or str(store.directory))  # a migration's leftovers
    # every FAISS file the generation names, loaded or not: one a writer could not load is
    # repair's to rebuild (or index.json's to be restored), never a stray
    keep = {name for name, *_ in store.snapshot.faiss_segments} | set(store.faiss_files) | \
        {store.settings.get("template", "")}
    for p in (store.directory / FAISS_DIR).iterdir():
        if p.name not in keep:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    for p in store.directory.glob(f".{store.directory.name}.*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed

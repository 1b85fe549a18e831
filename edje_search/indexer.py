"""Writing image files into an index: decode -> embed -> commit, and keeping it in step with a folder.

Flow of a build: paths -> skip what is indexed and unchanged -> decode workers (images.py) ->
model (pipeline.ImageEmbedder) -> rows committed every ``commit_every`` images on a writer
thread (pipeline.BackgroundCommits), so the model never waits on the disk. Files whose content
is already indexed under another path get copies of that row's vectors and tokens, without a
model pass. Every write holds the index's writer lock.

:func:`changed_or_gone` is the one rule deciding which indexed files must be embedded again or
dropped; the single-process build here and the Ray build (distributed/build.py) both use it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Iterable, Sequence

import numpy as np

from .errors import BadInput
from .images import is_image_path, iter_image_files
from .photo_meta import merged, stored_file_fields
from .models.bundle import EdjeModel
from .pipeline import BackgroundCommits, EmbeddedBatch, ImageEmbedder, embed_files
from .storage.filtered_search import ensure_field_indexes
from .storage.index_store import IndexStore, write_skipped
from .storage.manifest import ManifestEntry
from .storage.roots import record_folders
from .storage.token_store import working_dtype
from .validation import check_removal_size, removal_paths

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildReport:
    added: int = 0
    unchanged: int = 0
    removed: int = 0
    duplicates: int = 0  # added by copying the rows of identical content, without a model pass
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.added} added ({self.duplicates} duplicates of indexed content), {self.unchanged} unchanged, "
                f"{self.removed} removed, {len(self.skipped)} skipped")


def file_stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file, (-1, -1) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def is_changed(entry: ManifestEntry) -> bool:
    """The indexed file differs from what was embedded: its size or modification time moved.

    Rows stored without a size (-1: embeddings computed elsewhere and added without file
    stats) cannot be compared and count as unchanged."""
    return entry.size >= 0 and file_stat(entry.path) != (entry.size, entry.mtime_ns)


def changed_or_gone(store: IndexStore, paths: Sequence[str], root: str | None = None,
                    seen: set[str] | None = None) -> tuple[list[int], list[int]]:
    """(rows whose file among ``paths`` changed, rows under folder ``root`` whose file is not in
    ``seen``, i.e. was deleted): what a build embeds again and what it drops."""
    changed = [e.row for e in store.lookup_paths(list(paths)).values() if is_changed(e)]
    gone: list[int] = []
    if root is not None:
        root_abs = os.path.abspath(root)
        seen = seen or set()
        gone = [e.row for e in store.live_under(root_abs.rstrip(os.sep) + os.sep) if e.path not in seen]
        if os.path.isfile(root_abs) or not os.path.exists(root_abs):
            gone += [e.row for path, e in store.lookup_paths([root_abs]).items() if path not in seen]
    return changed, gone


class Indexer:
    """Adds, replaces and removes the rows of an index (the writing half of an Engine)."""

    def __init__(self, store: IndexStore, model: EdjeModel):
        self.store = store
        self.model = model
        self._store_lock = threading.RLock()  # commits run on a writer thread while embedding goes on
        self.extra_meta: dict[str, dict] = {}  # absolute path -> user fields (a --metadata sidecar) for this build

    # --------------------------------------------------------------------------- from files
    def add(self, paths: Iterable[str | os.PathLike], *, batch_size: int = 32, num_workers: int = 2,
            commit_every: int = 512, progress: bool = True, report: BuildReport | None = None,
            removed_rows: Sequence[int] = (), optimize: bool = True, metadata: dict[str, dict] | None = None
            ) -> BuildReport:
        """Embed and commit image files; see :meth:`Engine.add`."""
        report = report or BuildReport()
        self.extra_meta = dict(metadata or {})
        with self.store.writing(), self._embedder(batch_size, num_workers) as embedder:
            ensure_field_indexes(self.store.manifest)
            self._add_paths(paths, report, removed_rows, embedder, commit_every=commit_every, progress=progress)
            if optimize:
                self.store.optimize()
            write_skipped(self.store.directory, report.skipped)
        logger.info("add: %s", report.summary())
        return report

    def sync(self, root: str | os.PathLike, *, chunk_files: int = 4096, batch_size: int = 32, num_workers: int = 2,
             commit_every: int = 512, progress: bool = True, metadata: dict[str, dict] | None = None) -> BuildReport:
        """Make the index mirror the images under ``root``; see :meth:`Engine.sync`."""
        report = BuildReport()
        self.extra_meta = dict(metadata or {})
        seen: set[str] = set()
        chunk: list[str] = []
        with self.store.writing(), self._embedder(batch_size, num_workers) as embedder:
            ensure_field_indexes(self.store.manifest)

            def flush() -> None:
                changed, _ = changed_or_gone(self.store, chunk)
                self._add_paths(chunk, report, changed, embedder, commit_every=commit_every, progress=progress)
                chunk.clear()

            for path in iter_image_files(root):
                p = os.path.abspath(path)
                seen.add(p)
                chunk.append(p)
                if len(chunk) >= chunk_files:
                    flush()
            flush()
            _, gone = changed_or_gone(self.store, [], root=os.fspath(root), seen=seen)
            if gone:
                self.store.remove_rows(gone)
            report.removed = len(gone)
            self.store.optimize()
            write_skipped(self.store.directory, report.skipped)
        logger.info("sync %s: %s", root, report.summary())
        return report

    def remove(self, paths: Iterable[str | os.PathLike], *, allow_all: bool = False) -> int:
        """Drop the rows of these files, or of every file under a folder given; returns how many.
        Empty or blank paths are refused, and so is emptying the whole index unless ``allow_all``."""
        wanted = removal_paths(paths)
        with self.store.writing():
            rows = [e.row for e in self.store.lookup_paths(wanted).values()]
            for p in wanted:  # a folder, even one already deleted from disk: everything under it
                rows += [e.row for e in self.store.live_under(p.rstrip(os.sep) + os.sep)]
            check_removal_size(len(set(rows)), len(self.store), allow_all, wanted)
            return self.remove_rows(rows)

    def remove_rows(self, rows: Iterable[int]) -> int:
        """Drop these rows (one commit, then FAISS upkeep); returns how many."""
        rows = sorted(set(int(r) for r in rows))
        with self.store.writing():
            if rows:
                self.store.remove_rows(rows)
                self.store.optimize()
        logger.info("removed %d rows", len(rows))
        return len(rows)

    def _embedder(self, batch_size: int, num_workers: int) -> ImageEmbedder:
        """Decode workers + model for a whole build (one long-lived DataLoader, not one per chunk)."""
        return ImageEmbedder(self.model, batch_size=batch_size, num_workers=num_workers,
                             token_dtype=working_dtype(self.store.config.token_dtype),
                             known_hashes=self.store.hash_lookup())

    def _add_paths(self, paths: Iterable[str | os.PathLike], report: BuildReport, removed_rows: Sequence[int],
                   embedder: ImageEmbedder, *, commit_every: int, progress: bool) -> None:
        todo = []
        for p in paths:
            p = os.path.abspath(p)
            if not is_image_path(p):
                report.skipped.append((p, "not an image file extension"))
            else:
                todo.append(p)
        record_folders(self.store.directory, todo)  # where each folder really is, for serving its files
        dropped = set(int(r) for r in removed_rows)
        indexed = {path: e for path, e in self.store.lookup_paths(todo).items() if e.row not in dropped}
        known = set(indexed)
        report.unchanged += sum(1 for p in todo if p in known)
        self._fill_metadata(indexed.values())
        todo = list(dict.fromkeys(p for p in todo if p not in known))
        missed = self._embed_and_commit(embedder, todo, report, list(removed_rows),
                                        commit_every=commit_every, progress=progress)
        if missed:  # duplicates of rows removed meanwhile: embed them after all
            with ImageEmbedder(self.model, batch_size=embedder.batch_size, num_workers=0,
                               token_dtype=embedder.token_dtype) as again:
                self._embed_and_commit(again, missed, report, [], commit_every=commit_every, progress=False)

    def _fill_metadata(self, entries: Iterable[ManifestEntry]) -> None:
        """Give unchanged rows the metadata they lack (indexed before metadata was collected, or
        fields the sidecar brings now): the file's header is parsed again, nothing is embedded."""
        updates = {}
        for e in entries:
            extra = self.extra_meta.get(e.path)
            base = e.meta or {}
            fresh = stored_file_fields(e.path) if "width" not in base else None
            new = merged(base, fresh, extra)
            if new and new != base:
                updates[e.row] = new
        if updates:
            self.store.manifest.update_meta(updates)
            logger.info("metadata filled in for %d indexed files", len(updates))

    def _embed_and_commit(self, embedder: ImageEmbedder, todo: list[str], report: BuildReport,
                          to_remove: list[int], *, commit_every: int, progress: bool) -> list[str]:
        """Embed ``todo`` and commit every ``commit_every`` rows on a writer thread. Returns the
        paths reported as duplicates of content that is no longer indexed (the caller embeds them)."""
        pending: list[EmbeddedBatch] = []
        n_pending = 0
        missed: list[str] = []
        with BackgroundCommits() as committer:
            for batch in embedder.embed(todo, progress=progress):
                report.skipped.extend(batch.failed)
                if batch.duplicates:  # same content as an indexed file: copy its rows, no model pass
                    with self._store_lock:
                        missed += self._copy_duplicates(batch, report)
                if batch.paths:
                    pending.append(batch)
                    n_pending += len(batch.paths)
                if n_pending >= commit_every:
                    committer.submit(self._commit, pending, to_remove, report)
                    pending, n_pending, to_remove = [], 0, []
            committer.submit(self._commit, pending, to_remove, report)
        return missed

    def _copy_duplicates(self, batch: EmbeddedBatch, report: BuildReport) -> list[str]:
        rows = [self.store.row_of_hash(h) for _, h, _ in batch.duplicates]
        dup = [(d, r) for d, r in zip(batch.duplicates, rows) if r is not None]
        report.duplicates += len(dup)
        if dup:
            rows = [r for _, r in dup]
            batch.paths += [p for (p, _, _), _ in dup]
            batch.hashes += [h for (_, h, _), _ in dup]
            batch.stats += [st for (_, _, st), _ in dup]
            batch.vectors = np.concatenate([batch.vectors, self.store.vectors(rows)])
            batch.tokens = np.concatenate([batch.tokens, self.store.tokens.get(rows).astype(batch.tokens.dtype)])
        return [p for (p, _, _), r in zip(batch.duplicates, rows) if r is None]

    def _commit(self, batches: list[EmbeddedBatch], removed_rows: Sequence[int] = (),
                report: BuildReport | None = None) -> int:
        if not batches and not removed_rows:
            return 0
        cfg = self.store.config
        paths = [p for b in batches for p in b.paths]
        vectors = np.concatenate([b.vectors for b in batches]) if batches else np.zeros((0, cfg.dim), np.float32)
        tokens = np.concatenate([b.tokens for b in batches]) if batches else np.zeros(
            (0, cfg.tokens_per_image, cfg.token_width), np.float16)
        with self._store_lock:  # the embedding thread reads the store for duplicates meanwhile
            meta = [merged(b.meta.get(p), self.extra_meta.get(p)) for b in batches for p in b.paths]
            self.store.commit(paths, [h for b in batches for h in b.hashes], vectors, tokens,
                              removed_rows=removed_rows, new_stats=[st for b in batches for st in b.stats],
                              new_meta=meta)
        if report is not None:
            report.added += len(paths)
        return len(paths)

    # ------------------------------------------------------------------ from embeddings
    def add_embeddings(self, paths: Sequence[str], vectors: np.ndarray, tokens: np.ndarray, *,
                       metadata: Sequence[dict | None] | None = None, hashes: Sequence[str | None] | None = None,
                       stats: Sequence[tuple[int, int]] | None = None, commit_every: int = 100_000,
                       optimize: bool = True) -> BuildReport:
        """Add rows computed elsewhere; see :meth:`Engine.add_embeddings`."""
        cfg = self.store.config
        paths = [os.fsdecode(p) for p in paths]
        vectors = np.asarray(vectors)
        tokens = np.asarray(tokens)
        n = len(paths)
        if vectors.shape != (n, cfg.dim):
            raise BadInput(f"vectors must have shape ({n}, {cfg.dim}), got {vectors.shape}")
        if tokens.shape != (n, cfg.tokens_per_image, cfg.token_width):
            raise BadInput(f"tokens must have shape ({n}, {cfg.tokens_per_image}, {cfg.token_width}), "
                           f"got {tokens.shape}")
        for name, arr in (("vectors", vectors), ("tokens", tokens)):
            if not np.issubdtype(arr.dtype, np.floating):
                raise BadInput(f"{name} must be floating point, got {arr.dtype}")
            if not np.all(np.isfinite(arr)):
                raise BadInput(f"{name} contain NaN or infinite values")
        if len(set(paths)) != n:
            raise BadInput("paths repeat within one add_embeddings call")
        for given, what in ((metadata, "metadata"), (hashes, "hashes"), (stats, "stats")):
            if given is not None and len(given) != n:
                raise BadInput(f"{what} has {len(given)} entries for {n} paths")
        report = BuildReport()
        with self.store.writing():
            ensure_field_indexes(self.store.manifest)
            known = self.store.lookup_paths(paths)
            keep = np.array([p not in known for p in paths], dtype=bool)
            report.unchanged = int((~keep).sum())
            idx = np.nonzero(keep)[0]
            for s in range(0, len(idx), commit_every):
                part = idx[s:s + commit_every]
                self.store.commit([paths[i] for i in part], [hashes[i] if hashes else None for i in part],
                                  vectors[part].astype(np.float32), tokens[part],
                                  new_stats=[stats[i] for i in part] if stats is not None else None,
                                  new_meta=[metadata[i] for i in part] if metadata is not None else None)
                report.added += len(part)
            if optimize:
                self.store.optimize()
        return report

    # ------------------------------------------------------------------------- checking
    def check_sample(self, n: int) -> list[str]:
        """Re-embed ``n`` indexed files (a fixed sample) and compare them with their stored rows."""
        rng = np.random.default_rng(0)
        entries = [e for e in self.store.iter_entries() if os.path.isfile(e.path)]
        if not entries:
            return []
        pick = [entries[i] for i in sorted(rng.choice(len(entries), min(n, len(entries)), replace=False))]
        by_path = {e.path: e for e in pick}
        problems = []
        dtype = working_dtype(self.store.config.token_dtype)
        for batch in embed_files(self.model, [e.path for e in pick], batch_size=16, num_workers=0,
                                 token_dtype=dtype, progress=False):
            rows = [by_path[p].row for p in batch.paths]
            if not rows:
                continue
            stored_v = self.store.vectors(rows)
            stored_t = self.store.tokens.get(rows).astype(np.float32)
            for i, p in enumerate(batch.paths):
                if not np.allclose(stored_v[i], batch.vectors[i], atol=1e-3):
                    problems.append(f"re-embedding {p} gives a different vector than row {rows[i]} holds")
                elif not np.allclose(stored_t[i], batch.tokens[i].astype(np.float32), atol=5e-2, rtol=2e-2):
                    problems.append(f"re-embedding {p} gives different tokens than row {rows[i]} holds")
        return problems

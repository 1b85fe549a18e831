"""The on-disk index: config, manifest, vector segments, the Zarr token store, FAISS segments.

Layout of an index directory (every path inside is relative to it, so it can move)::

    index.json          IndexConfig (recipe, widths, model path and fingerprint, store URL)
    manifest.sqlite     rows, segment lists, FAISS segment list, generation (storage/manifest.py)
    vectors/            first-stage vectors, one .npy segment per commit (storage/segments.py)
    tokens.zarr/        the tokens, a Zarr v3 group of sharded arrays (storage/token_store.py);
                        vectors/ and tokens.zarr/ may live under IndexConfig.store_url (s3://...)
    faiss/              one FAISS file per segment of rows, plus the trained template
    model/              the model, when the index was created from one built in memory
    writer.lock         held by the one writer (storage/lock.py)
    skipped.jsonl       files the last build could not use, with the reason

A commit costs O(rows in the batch): it writes the batch's vector segment, token shards and
FAISS segment as new files, then commits one SQLite transaction naming them (the commit point);
only ``repair`` ever replaces a stored file, and then whole.
A commit's first row is the first row of a token shard, so no commit touches a file an earlier
one wrote; the row numbers skipped in between are never used. Nothing
already committed is rewritten, so a crash at any moment leaves the previous generation whole;
files a crashed commit wrote are named by no generation and are removed by the next writer.
Small FAISS segments are merged, and the recipe retrained as the index grows, by
:meth:`IndexStore.optimize`, which is itself one commit.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..config import IndexConfig, save_config
from ..errors import BadInput, IndexCorrupt, IndexOutdated
from ..fsutil import atomic_write
from . import compaction, identity, integrity, layout, vector_index
from .layout import CONFIG_FILE, FAISS_DIR, REFINE_FACTOR, SKIPPED_FILE
from .checksums import non_finite_rows, written_checksums
from .creation import create_index_dir
from .lock import WriterLock
from .manifest import MANIFEST_FILE, HashLookup, Manifest, ManifestEntry, Snapshot
from .rows import RowArray
from .segments import SegmentArray
from .token_store import LAYOUT as TOKEN_LAYOUT
from .token_store import TokenStore

logger = logging.getLogger(__name__)

__all__ = ["IndexStore", "ManifestEntry", "IndexCorrupt", "CONFIG_FILE"]


class IndexStore:
    """Reads and commits one index directory."""

    def __init__(self, directory: Path, config: IndexConfig, manifest: Manifest, mode: str = "r",
                 lock_wait: float = 0.0):
        self.directory, self.config, self.manifest, self.mode = directory, config, manifest, mode
        base = config.store_url or str(directory)
        self.vector_array = SegmentArray(f"{base.rstrip('/')}/vectors", (config.dim,), "float32")
        self.tokens = TokenStore(base, config.tokens_per_image, config.token_width, config.token_dtype,
                                 config.token_shard_rows, scale_chunk_rows=config.scale_chunk_rows)
        self.arrays: dict[str, RowArray] = {"vectors": self.vector_array, **self.tokens.arrays}  # manifest's names
        self.lock = WriterLock(directory, wait=lock_wait) if mode != "r" else None
        self._writer_thread = threading.RLock()
        self.identity = identity.identity(directory, config)
        self._load_latest()

    # ------------------------------------------------------------------------------- state
    def adopt(self, snap: Snapshot) -> None:
        """Adopt a committed generation: segment lists, FAISS segments, tombstones."""
        if snap.settings.get("token_store") != TOKEN_LAYOUT and snap.segments.get("tokens"):
            raise IndexOutdated(f"index {self.directory} keeps its tokens in edje-search 0.2's .npy segments: convert "
                                f"it once with `edje-search migrate --index {self.directory}`")
        self.snapshot = snap
        self.vector_array.set_segments(snap.segments.get("vectors", ()))
        self.tokens.set_segments(snap.segments)
        if len(self.vector_array) != snap.n_rows or len(self.tokens) != snap.n_rows:
            raise IndexCorrupt(f"index {self.directory}: stores hold {len(self.vector_array)} vector and "
                               f"{len(self.tokens)} token rows, manifest {snap.n_rows} (run `edje-search repair`)")
        self.faiss_files = {}
        self.damaged_faiss: list[str] = []
        for name, recipe, _first, _end in snap.faiss_segments:
            try:
                self.faiss_files[name] = self._read_faiss(name, recipe)
            except IndexCorrupt as e:
                if self.mode == "r":
                    raise
                self.damaged_faiss.append(str(e))  # a writer opens anyway, so that repair can rebuild it
        self.tombstones = np.asarray(self.manifest.removed_rows(snap.generation), dtype=np.int64)

    def _read_faiss(self, name: str, recipe: str):
        return read_faiss_file(self.directory / FAISS_DIR / name, recipe, self.config.dim)

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    @property
    def n_rows(self) -> int:
        """One past the last row ever committed (live or removed; rows between commits are gaps)."""
        return self.snapshot.n_rows

    def __len__(self) -> int:
        """Number of live (searchable) images."""
        return self.snapshot.n_live

    @property
    def settings(self) -> dict:
        return self.snapshot.settings

    @property
    def recipe(self) -> str:
        """The FAISS recipe new segments are written with ("Flat" until a trained recipe takes over)."""
        return self.settings.get("recipe", "Flat")

    @property
    def faiss_segments(self) -> list:
        return list(self.faiss_files.values())

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, directory: str | Path, config: IndexConfig,
               populate: Callable[[Path], IndexConfig | None] | None = None) -> "IndexStore":
        """A new, empty index, created atomically (storage/creation.py); raises IndexExists if
        another process created ``directory`` first."""
        create_index_dir(Path(directory), config, populate)
        store = cls.open(directory, mode="r+")
        store.publish()  # an empty group and arrays, so that Zarr readers open a new index too
        return store

    @classmethod
    def open(cls, directory: str | Path, mode: str = "r", lock_wait: float = 0.0) -> "IndexStore":
        directory = Path(directory)
        if not directory.is_dir():
            raise IndexCorrupt(f"no index at {directory} (build one with `edje-search build-index`)")
        if not (directory / CONFIG_FILE).is_file():
            raise IndexCorrupt(f"{directory} is not an edje-search index (no {CONFIG_FILE})")
        config = read_config(directory)
        return cls(directory, config, Manifest(directory / MANIFEST_FILE, readonly=mode == "r"), mode=mode,
                   lock_wait=lock_wait)

    def refresh(self) -> bool:
        """Adopt the latest committed generation, or the index that replaced this one at the
        same path; True if it changed. Raises IndexGone when the index was removed."""
        if identity.follow(self, read_config):
            return True
        if self.manifest.generation() == self.generation:
            return False
        self._load_latest()
        return True

    def _load_latest(self) -> None:
        """Load the latest generation; if a writer replaced (and deleted) its FAISS segments while
        we were reading them, load the writer's newer generation instead."""
        for attempt in range(10):
            snap = self.manifest.snapshot()
            try:
                self.adopt(snap)
                return
            except IndexCorrupt:
                if attempt == 9 or self.manifest.generation() == snap.generation:
                    raise

    # ------------------------------------------------------------------------------- writing
    @contextmanager
    def writing(self):
        """Hold the writer lock, on the latest generation, with a crashed commit's debris removed
        (once index.json is known to describe what is stored: else nothing is a stray)."""
        if self.lock is None:
            raise IndexCorrupt("index opened read-only")
        with self._writer_thread:  # threads of one process take turns too (the file lock is per process)
            outer = not self.lock.held
            with self.lock:
                if outer:
                    self.refresh()
                    integrity.check_config_against_segments(self)
                    integrity.remove_stray_files(self)
                    self.publish(only_if_stale=True)  # a crash may have come after the last commit
                yield self

    def require_lock(self, repairing: bool = False) -> None:
        if self.lock is None:
            raise IndexCorrupt("index opened read-only")
        if not self.lock.held:
            raise IndexCorrupt("commit without the writer lock (use `with store.writing():`)")
        if self.damaged_faiss and not repairing:
            raise IndexCorrupt(f"{self.damaged_faiss[0]}")

    def commit(self, new_paths: Sequence[str], new_hashes: Sequence[str | None], vectors: np.ndarray,
               tokens: np.ndarray, removed_rows: Iterable[int] = (),
               new_stats: Sequence[tuple[int, int]] | None = None,
               new_meta: Sequence[dict | None] | None = None) -> None:
        """Append rows for ``new_paths`` and drop ``removed_rows``, atomically, in O(batch).

        ``new_stats`` gives (size, mtime_ns) per new path, used to notice changed files later;
        ``new_meta`` optional metadata (captions, ...) kept in the manifest.
        """
        self.require_lock()
        b = len(new_paths)
        check_batch(self.config, new_paths, new_hashes, vectors, tokens)
        removed = sorted({int(r) for r in removed_rows})
        if not b and not removed:
            return
        start, gen = self.next_row(), self.generation + 1
        segs: list[tuple[str, int, int]] = []
        faiss_list = [(n, r, a, e) for n, r, a, e in self.snapshot.faiss_segments]
        new_faiss = None
        if b:
            segs.append(("vectors", *self.vector_array.write_segment(start, vectors)))
            layout.fault("after_vectors")
            segs += self.tokens.write_segment(start, tokens)
            layout.fault("after_tokens")
            name = f"seg-{start:012d}-g{gen}.index"
            # new rows land in a flat segment (a memcpy, whatever the recipe): encoding them for an
            # IVF or PQ recipe costs O(batch x lists) and is left to optimize(), which folds these
            # deltas into the recipe MERGE_FANOUT at a time
            index = vector_index.new_segment_index("Flat", self.config.dim)
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                               np.arange(start, start + b, dtype=np.int64))
            self.write_faiss(index, name)
            faiss_list.append((name, "Flat", start, start + b))
            new_faiss = name
            layout.fault("after_faiss")
        stats = new_stats or [(-1, -1)] * b
        meta = new_meta or [None] * b
        entries = [ManifestEntry(start + i, p, h, int(st[0]), int(st[1]), mt)
                   for i, (p, h, st, mt) in enumerate(zip(new_paths, new_hashes, stats, meta))]
        settings = None if self.settings.get("token_store") == TOKEN_LAYOUT else \
            dict(self.settings, token_store=TOKEN_LAYOUT)
        n_rows = start + b if b else self.n_rows
        self.manifest.commit(generation=gen, n_rows=n_rows, new=entries, removed=removed, add_segments=segs,
                             faiss_segments=faiss_list if b else None, checksums=written_checksums(self.arrays, segs),
                             settings=settings)
        layout.fault("after_manifest")
        # adopt the new generation in memory without re-reading what did not change
        snap = self.snapshot
        seg_map = {k: list(v) for k, v in snap.segments.items()}
        for store, s, n in segs:
            seg_map.setdefault(store, []).append((s, n))
        self.snapshot = dataclasses.replace(snap, generation=gen, n_rows=n_rows,
                                            n_live=snap.n_live + b - count_live(removed, self.tombstones),
                                            segments=seg_map, faiss_segments=faiss_list,
                                            settings=settings if settings is not None else snap.settings)
        self.vector_array.set_segments(seg_map.get("vectors", ()))
        self.tokens.set_segments(seg_map)
        if new_faiss:
            self.faiss_files[new_faiss] = self._read_faiss(new_faiss, "Flat")
        if removed:
            self.tombstones = np.union1d(self.tombstones, np.asarray(removed, dtype=np.int64))
        if b:
            self.publish()

    def next_row(self) -> int:
        """The first row of the next commit: the first row of the next token shard."""
        return -(-self.n_rows // self.tokens.shard_rows) * self.tokens.shard_rows

    def publish(self, only_if_stale: bool = False) -> None:
        """Let plain Zarr readers see every committed token row (TokenStore.publish). The engine
        never reads what this writes: a failure is logged, and the next writer publishes again."""
        try:
            if not only_if_stale or self.tokens.published_rows() != self.n_rows:
                self.tokens.publish(self.n_rows, self.config.model_fingerprint)
        except OSError as e:
            logger.warning("could not update the token store's zarr.json (the index is fine): %s", e)

    def remove_rows(self, rows: Sequence[int]) -> None:
        """A commit that only drops ``rows`` (removed or deleted files)."""
        m, d = self.config.tokens_per_image, self.config.token_width
        self.commit([], [], np.zeros((0, self.config.dim), np.float32), np.zeros((0, m, d), np.float16),
                    removed_rows=rows)

    def write_faiss(self, index, name: str) -> None:
        atomic_write(self.directory / FAISS_DIR / name, lambda tmp: vector_index.write_index(index, tmp))

    # --------------------------------------------------------------------------------- reading
    def vectors(self, rows) -> np.ndarray:
        """First-stage embeddings (k, E) of the given rows."""
        return self.vector_array.get(rows)

    def paths(self, rows: Iterable[int]) -> dict[int, str]:
        """Row -> file path for those of ``rows`` that are live (one indexed lookup, never a scan)."""
        return self.manifest.paths_of_rows(rows, self.generation)

    def entries_of_rows(self, rows: Iterable[int]) -> dict[int, ManifestEntry]:
        return self.manifest.entries_of_rows(rows)

    def lookup_paths(self, paths: Sequence[str]) -> dict[str, ManifestEntry]:
        """Live entries of those ``paths`` that are indexed."""
        return self.manifest.lookup_paths(paths, self.generation)

    def live_under(self, prefix: str):
        return self.manifest.live_under(prefix, self.generation)

    def iter_entries(self):
        """Every live entry in row order, paged (verification, rebuilds, tests)."""
        return self.manifest.iter_live(self.generation)

    @property
    def entries(self) -> list[ManifestEntry]:
        """Every live entry as a list: for small indexes and tests; large ones use iter_entries."""
        return list(self.iter_entries())

    def row_of_hash(self, sha256: str) -> int | None:
        return self.manifest.row_of_hash(sha256, self.generation)

    def hash_lookup(self) -> HashLookup:
        """``sha in lookup`` for DataLoader workers (picklable; opens its own read-only connection)."""
        return HashLookup(self.manifest.path, self.generation)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, E) queries -> (scores (Q, k), rows (Q, k)) over the live rows; rows -1 where fewer exist."""
        recipe = self.recipe
        want = k * REFINE_FACTOR if vector_index.needs_refine(recipe) else k
        scores, rows = vector_index.search_segments(self.faiss_segments, queries, want, exclude=self.tombstones,
                                                    nprobe=self.settings.get("nprobe"),
                                                    ef_search=self.settings.get("ef_search"))
        if want != k:  # lossy codes: re-score the candidates exactly from the stored vectors
            scores, rows = vector_index.refine_exact(np.asarray(queries, np.float32), rows, k, self.vectors)
        return scores, rows

    # ------------------------------------------------------------------- maintenance, integrity
    def optimize(self) -> dict:
        """Merge small FAISS segments, or retrain the recipe as the index grows (storage/compaction.py)."""
        return compaction.optimize(self)

    def verify(self) -> list[str]:
        """Every check that needs no model (storage/integrity.py); [] = healthy."""
        return integrity.verify(self)

    def repair(self) -> integrity.RepairReport:
        """Drop unreadable rows and rebuild FAISS from the stored vectors (storage/integrity.py)."""
        return integrity.repair(self)

    @property
    def model_dir(self) -> Path:
        """The directory of the model the index was built with: a relative path in the config is
        inside the index, so the index can move with its model."""
        p = Path(self.config.model_path)
        return p if p.is_absolute() else self.directory / p

    def record_model_dir(self, model_dir: str | Path) -> None:
        """Point the index at ``model_dir`` (relative when inside it) after the model moved; writer lock held."""
        self.require_lock()
        model_dir = Path(model_dir).resolve()
        try:
            path = str(model_dir.relative_to(self.directory.resolve()))
        except ValueError:
            path = str(model_dir)
        self.config = dataclasses.replace(self.config, model_path=path)
        save_config(self.config, self.directory / CONFIG_FILE)


def count_live(rows: Sequence[int], tombstones: np.ndarray) -> int:
    """How many of ``rows`` (committed rows) are not removed yet."""
    return int(np.count_nonzero(~np.isin(np.asarray(rows, dtype=np.int64), tombstones))) if len(rows) else 0


def read_faiss_file(path: Path, recipe: str, dim: int):
    """One committed FAISS segment file, memory-mapped; IndexCorrupt naming the way out if it is
    missing, unreadable or of another width than the index."""
    if not path.is_file():
        raise IndexCorrupt(f"FAISS file missing: {path} (run `edje-search repair` to rebuild it "
                           f"from the stored vectors)")
    try:
        index = vector_index.read_segment(path, recipe)
    except RuntimeError as e:
        raise IndexCorrupt(f"FAISS file unreadable: {path} (run `edje-search repair` to rebuild it "
                           f"from the stored vectors)") from e
    if index.d != dim:
        raise IndexCorrupt(f"FAISS file {path} holds {index.d}-d vectors but {CONFIG_FILE} says {dim}")
    return index


def check_batch(config: IndexConfig, paths: Sequence[str], hashes: Sequence, vectors: np.ndarray,
                tokens: np.ndarray) -> None:
    """Refuse a batch the index cannot store: lengths or shapes that disagree, or NaN/inf values
    (a non-finite vector or token would never match a query again, so it is never stored)."""
    b = len(paths)
    m, d = config.tokens_per_image, config.token_width
    if not (len(hashes) == b == len(vectors) == len(tokens)):
        raise BadInput("commit: paths, hashes, vectors and tokens disagree in length")
    if b and (vectors.shape[1:] != (config.dim,) or tokens.shape[1:] != (m, d)):
        raise BadInput(f"commit: vectors {vectors.shape[1:]} / tokens {tokens.shape[1:]} do not match the "
                       f"index ({config.dim},) / ({m}, {d})")
    for what, values in (("vectors", vectors), ("tokens", tokens)):
        bad = non_finite_rows(np.asarray(values))
        if bad.size:
            raise BadInput(f"{paths[int(bad[0])]}: its {what} hold NaN or infinite values ({bad.size} of "
                           f"{len(values)} rows in this batch); not stored (is the model damaged?)")


def write_skipped(directory: str | Path, skipped: Sequence[tuple[str, str]]) -> Path:
    """INDEX/skipped.jsonl: one {"path", "reason"} per file the last build could not use.

    Non-UTF-8 file names are written with surrogate escapes (``\\udcXY``), so every line parses."""
    import json

    path = Path(directory) / SKIPPED_FILE
    atomic_write(path, lambda tmp: tmp.write_text(
        "".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in skipped), encoding="utf-8"))
    return path


def read_config(directory: Path) -> IndexConfig:
    import json

    try:
        raw = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise IndexCorrupt(f"index at {directory} is corrupt: {CONFIG_FILE}: {e}") from e
    if raw.get("format_version", 1) < 2:
        raise IndexCorrupt(f"index at {directory} was written by edje-search 0.1 (format 1); build it again "
                           f"into a new folder with `edje-search build-index`")
    try:
        return IndexConfig.from_dict(raw, directory / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise IndexCorrupt(f"index at {directory} is corrupt: {e}") from e



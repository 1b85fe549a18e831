"""The on-disk index: config, manifest, vector and token segments, FAISS segments.

Layout of an index directory (every path inside is relative to it, so it can move)::

    index.json          IndexConfig (recipe, widths, model path and fingerprint, store URL)
    manifest.sqlite     rows, segment lists, FAISS segment list, generation (storage/manifest.py)
    vectors/, tokens/   append-only row segments, one per commit (storage/segments.py);
                        or under IndexConfig.store_url (e.g. s3://bucket/prefix)
    faiss/              one FAISS file per segment of rows, plus the trained template
    model/              the model, when the index was created from one built in memory
    writer.lock         held by the one writer (storage/lock.py)
    skipped.jsonl       files the last build could not use, with the reason

A commit costs O(rows in the batch): it writes the batch's vector, token and FAISS segments
as new files, then commits one SQLite transaction naming them (the commit point). Nothing
already committed is rewritten, so a crash at any moment leaves the previous generation whole;
files a crashed commit wrote are named by no generation and are removed by the next writer.
Small FAISS segments are merged, and the recipe retrained as the index grows, by
:meth:`IndexStore.optimize`, which is itself one commit.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..config import IndexConfig, load_config, save_config
from ..errors import BadInput, IndexCorrupt, IndexExists
from ..fsutil import atomic_write
from . import vector_index
from .lock import WriterLock
from .manifest import MANIFEST_FILE, HashLookup, Manifest, ManifestEntry, Snapshot
from .segments import SegmentArray, is_remote
from .token_store import SegmentTokenStore

logger = logging.getLogger(__name__)

CONFIG_FILE = "index.json"
SKIPPED_FILE = "skipped.jsonl"
FAISS_DIR = "faiss"
MERGE_FANOUT = 8  # merge a run of this many similar-sized FAISS segments into one (a log-structured merge)
REFINE_FACTOR = 4  # candidates per wanted hit that lossy recipes re-score exactly
TARGET_RECALL = 0.95
IndexError_ = IndexCorrupt  # the 0.1 name, kept for old callers

__all__ = ["IndexStore", "ManifestEntry", "IndexCorrupt", "IndexError_", "CONFIG_FILE"]


def _fault(point: str) -> None:
    """Deterministic crash injection for the crash-safety tests: EDJE_FAULT=<point> kills the
    process (as kill -9 would: no cleanup, no flush) when the commit reaches ``point``."""
    if os.environ.get("EDJE_FAULT") == point:
        os._exit(137)


@dataclasses.dataclass
class RepairReport:
    dropped: list[str] = dataclasses.field(default_factory=list)  # paths whose rows were unreadable
    rebuilt_faiss: bool = False
    removed_files: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.dropped)} unreadable rows dropped (re-run build-index to embed them again), "
                f"FAISS {'rebuilt from the stored vectors' if self.rebuilt_faiss else 'intact'}, "
                f"{len(self.removed_files)} stray files removed")


class IndexStore:
    """Reads and commits one index directory."""

    def __init__(self, directory: Path, config: IndexConfig, manifest: Manifest, mode: str = "r",
                 lock_wait: float = 0.0):
        self.directory = directory
        self.config = config
        self.manifest = manifest
        self.mode = mode
        base = config.store_url or str(directory)
        self._vectors = SegmentArray(f"{base.rstrip('/')}/vectors", (config.dim,), "float32")
        self.tokens = SegmentTokenStore(base, config.tokens_per_image, config.token_width, config.token_dtype)
        self.lock = WriterLock(directory, wait=lock_wait) if mode != "r" else None
        self._writer_thread = threading.RLock()
        self._load_latest()

    # ------------------------------------------------------------------------------- state
    def _load(self, snap: Snapshot) -> None:
        """Adopt a committed generation: segment lists, FAISS segments, tombstones."""
        self.snapshot = snap
        self._vectors.set_segments(snap.segments.get("vectors", ()))
        self.tokens.set_segments(snap.segments)
        if len(self._vectors) != snap.n_rows or len(self.tokens) != snap.n_rows:
            raise IndexCorrupt(f"index {self.directory}: stores hold {len(self._vectors)} vector and "
                               f"{len(self.tokens)} token rows, manifest {snap.n_rows} (run `edje-search repair`)")
        self._faiss = {}
        self.damaged_faiss: list[str] = []
        for name, recipe, _first, _end in snap.faiss_segments:
            try:
                self._faiss[name] = self._read_faiss(name, recipe)
            except IndexCorrupt as e:
                if self.mode == "r":
                    raise
                self.damaged_faiss.append(str(e))  # a writer opens anyway, so that repair can rebuild it
        self.tombstones = np.asarray(self.manifest.removed_rows(snap.generation), dtype=np.int64)

    def _read_faiss(self, name: str, recipe: str):
        path = self.directory / FAISS_DIR / name
        if not path.is_file():
            raise IndexCorrupt(f"FAISS file missing: {path} (run `edje-search repair` to rebuild it "
                               f"from the stored vectors)")
        try:
            index = vector_index.read_segment(path, recipe)
        except RuntimeError as e:
            raise IndexCorrupt(f"FAISS file unreadable: {path} (run `edje-search repair` to rebuild it "
                               f"from the stored vectors)") from e
        if index.d != self.config.dim:
            raise IndexCorrupt(f"FAISS file {path} holds {index.d}-d vectors but {CONFIG_FILE} says {self.config.dim}")
        return index

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    @property
    def n_rows(self) -> int:
        """Rows ever committed (live or removed): the length of the vector and token stores."""
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
        return list(self._faiss.values())

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, directory: str | Path, config: IndexConfig,
               populate: Callable[[Path], IndexConfig | None] | None = None) -> "IndexStore":
        """A new, empty index, created atomically: built in a temporary sibling folder (where
        ``populate`` may add files, e.g. the model, and return a final config) and renamed into place.
        If another process
        created ``directory`` first, this raises IndexExists and leaves it untouched."""
        directory = Path(directory)
        if (directory / CONFIG_FILE).exists():
            raise IndexExists(f"an index already exists in {directory}")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise BadInput(f"{directory} exists and is not an empty folder: choose a new index folder")
        if config.factory != vector_index.AUTO:
            vector_index.new_index(config.factory, config.dim)  # validate the factory string early
        if config.store_url and not is_remote(config.store_url):
            raise BadInput(f"store URL {config.store_url!r} is not a URL (leave it empty to store inside the index)")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.creating-", dir=directory.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an index folder is as readable as any other
        try:
            (tmp / FAISS_DIR).mkdir()
            if populate is not None:
                config = populate(tmp) or config
            m = Manifest(tmp / MANIFEST_FILE, readonly=False, create=True)
            m.initialise()
            m.close()
            save_config(config, tmp / CONFIG_FILE)
            try:
                os.rename(tmp, directory)  # replaces only an empty folder; fails if another creator won
            except OSError as e:
                if (directory / CONFIG_FILE).exists():
                    raise IndexExists(f"an index already exists in {directory}") from e
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(directory, mode="r+")

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
        """Adopt the latest committed generation; True if it changed."""
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
                self._load(snap)
                return
            except IndexCorrupt:
                if attempt == 9 or self.manifest.generation() == snap.generation:
                    raise

    # ------------------------------------------------------------------------------- writing
    @contextmanager
    def writing(self):
        """Hold the writer lock, on the latest generation, with a crashed commit's debris removed."""
        if self.lock is None:
            raise IndexCorrupt("index opened read-only")
        with self._writer_thread:  # threads of one process take turns too (the file lock is per process)
            outer = not self.lock.held
            with self.lock:
                if outer:
                    self.refresh()
                    self._remove_stray_files()
                yield self

    def _remove_stray_files(self) -> list[str]:
        removed = []
        for arr in [self._vectors, *self.tokens.arrays.values()]:
            removed += arr.remove_stray_files()
        keep = set(self._faiss) | {self.settings.get("template", "")}
        for p in (self.directory / FAISS_DIR).iterdir():
            if p.name not in keep:
                p.unlink(missing_ok=True)
                removed.append(p.name)
        for p in self.directory.glob(f".{self.directory.name}.*"):
            shutil.rmtree(p, ignore_errors=True)
        return removed

    def _require_lock(self, repairing: bool = False) -> None:
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
        self._require_lock()
        b = len(new_paths)
        m, d = self.config.tokens_per_image, self.config.token_width
        if not (len(new_hashes) == b == len(vectors) == len(tokens)):
            raise BadInput("commit: paths, hashes, vectors and tokens disagree in length")
        if b and (vectors.shape[1:] != (self.config.dim,) or tokens.shape[1:] != (m, d)):
            raise BadInput(f"commit: vectors {vectors.shape[1:]} / tokens {tokens.shape[1:]} do not match the "
                           f"index ({self.config.dim},) / ({m}, {d})")
        removed = sorted({int(r) for r in removed_rows})
        if not b and not removed:
            return
        start, gen = self.n_rows, self.generation + 1
        segs: list[tuple[str, int, int]] = []
        faiss_list = [(n, r, a, e) for n, r, a, e in self.snapshot.faiss_segments]
        new_faiss = None
        if b:
            segs.append(("vectors", *self._vectors.write_segment(start, vectors)))
            _fault("after_vectors")
            segs += self.tokens.write_segment(start, tokens)
            _fault("after_tokens")
            name = f"seg-{start:012d}-g{gen}.index"
            # new rows land in a flat segment (a memcpy, whatever the recipe): encoding them for an
            # IVF or PQ recipe costs O(batch x lists) and is left to optimize(), which folds these
            # deltas into the recipe MERGE_FANOUT at a time
            index = vector_index.new_segment_index("Flat", self.config.dim)
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                               np.arange(start, start + b, dtype=np.int64))
            self._write_faiss(index, name)
            faiss_list.append((name, "Flat", start, start + b))
            new_faiss = name
            _fault("after_faiss")
        stats = new_stats or [(-1, -1)] * b
        meta = new_meta or [None] * b
        entries = [ManifestEntry(start + i, p, h, int(st[0]), int(st[1]), mt)
                   for i, (p, h, st, mt) in enumerate(zip(new_paths, new_hashes, stats, meta))]
        self.manifest.commit(generation=gen, n_rows=start + b, new=entries, removed=removed, add_segments=segs,
                             faiss_segments=faiss_list if b else None)
        _fault("after_manifest")
        # adopt the new generation in memory without re-reading what did not change
        snap = self.snapshot
        seg_map = {k: list(v) for k, v in snap.segments.items()}
        for store, s, n in segs:
            seg_map.setdefault(store, []).append((s, n))
        self.snapshot = dataclasses.replace(snap, generation=gen, n_rows=start + b,
                                            n_live=snap.n_live + b - self._count_live(removed),
                                            segments=seg_map, faiss_segments=faiss_list)
        self._vectors.set_segments(seg_map.get("vectors", ()))
        self.tokens.set_segments(seg_map)
        if new_faiss:
            self._faiss[new_faiss] = self._read_faiss(new_faiss, "Flat")
        if removed:
            self.tombstones = np.union1d(self.tombstones, np.asarray(removed, dtype=np.int64))

    def _count_live(self, rows: list[int]) -> int:
        if not rows:
            return 0
        dead = set(self.tombstones.tolist())
        return sum(1 for r in rows if r not in dead and r < self.n_rows)

    def _write_faiss(self, index, name: str) -> None:
        atomic_write(self.directory / FAISS_DIR / name, lambda tmp: vector_index.write_index(index, tmp))

    def _template(self):
        name = self.settings.get("template")
        if not name:
            return None
        if getattr(self, "_template_cache", (None, None))[0] != name:
            self._template_cache = (name, vector_index.read_index(self.directory / FAISS_DIR / name))
        return self._template_cache[1]

    # --------------------------------------------------------------------------------- reading
    def vectors(self, rows) -> np.ndarray:
        """First-stage embeddings (k, E) of the given rows."""
        return self._vectors.get(rows)

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
            scores, rows = self._refine(np.asarray(queries, np.float32), rows, k)
        return scores, rows

    def _refine(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = rows >= 0
        uniq, inverse = np.unique(rows[valid], return_inverse=True)
        vecs = self.vectors(uniq)
        exact = np.full(rows.shape, -np.inf, np.float32)
        q_of = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)[valid]
        exact[valid] = np.einsum("nd,nd->n", queries[q_of], vecs[inverse])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)

    # ---------------------------------------------------------------------------- maintenance
    def optimize(self) -> dict:
        """Keep FAISS fast as the index grows (run by writers after their commits, not inside them).

        Retrains when the recipe for the current size differs from the one in use (after enough
        rows to train it: 39 per inverted list), re-encoding every live row into one segment;
        otherwise merges runs of MERGE_FANOUT similar-sized segments. Returns what it did.
        """
        self._require_lock()
        target = self.config.factory if self.config.factory != vector_index.AUTO else \
            vector_index.choose_recipe(len(self), self.config.dim)
        if target != self.recipe and len(self) >= max(vector_index.training_rows(target), 1):
            return self._retrain(target)
        merged = 0
        while True:
            run = self._mergeable_run()
            if not run:
                break
            self._merge(run)
            merged += 1
        return {"action": "merge" if merged else "none", "merges": merged, "segments": len(self._faiss)}

    def _mergeable_run(self) -> list[tuple[str, str, int, int]] | None:
        """Segments to merge next: MERGE_FANOUT flat deltas waiting for a trained recipe, or a run of
        MERGE_FANOUT segments of one recipe and similar size (so each row is re-encoded O(log n) times)."""
        segs = self.snapshot.faiss_segments
        if self.recipe != "Flat":
            deltas = [seg for seg in segs if seg[1] != self.recipe]
            if len(deltas) >= MERGE_FANOUT:
                return deltas[:MERGE_FANOUT]
        tier = [int(np.log(max(e - a, 1)) / np.log(MERGE_FANOUT)) for _, _, a, e in segs]
        i = 0
        while i < len(segs):
            j = i
            while j < len(segs) and tier[j] == tier[i] and segs[j][1] == segs[i][1]:
                j += 1
            if j - i >= MERGE_FANOUT:
                return segs[i:i + MERGE_FANOUT]
            i = j
        return None

    def _live_rows_in(self, first: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, vectors) of the live rows in [first, end), read from the stored vectors."""
        dead = self.tombstones
        rows_out, vecs_out = [], []
        for s, vecs in self._vectors.iter_rows(first=first, end=end):
            rows = np.arange(s, s + len(vecs), dtype=np.int64)
            keep = ~np.isin(rows, dead)
            rows_out.append(rows[keep])
            vecs_out.append(vecs[keep])
        if not rows_out:
            return np.zeros(0, np.int64), np.zeros((0, self.config.dim), np.float32)
        return np.concatenate(rows_out), np.concatenate(vecs_out)

    def _merge(self, run: list[tuple[str, str, int, int]]) -> None:
        first, end, recipe = run[0][2], run[-1][3], self.recipe
        gen = self.generation + 1
        rows, vecs = self._live_rows_in(first, end)
        index = vector_index.new_segment_index(recipe, self.config.dim, self._template())
        if len(rows):
            index.add_with_ids(np.ascontiguousarray(vecs), rows)
        name = f"seg-{first:012d}-g{gen}.index"
        self._write_faiss(index, name)
        names = {n for n, *_ in run}
        faiss_list = [s for s in self.snapshot.faiss_segments if s[0] not in names] + [(name, recipe, first, end)]
        faiss_list.sort(key=lambda s: s[2])
        self._commit_faiss(faiss_list, self.settings)
        logger.info("merged %d FAISS segments of rows [%d, %d) into %s", len(run), first, end, name)

    def _commit_faiss(self, faiss_list: list, settings: dict) -> None:
        """A commit that changes only the FAISS segment list and settings."""
        old = set(self._faiss) | {self.settings.get("template", "")}
        self.manifest.commit(generation=self.generation + 1, n_rows=self.n_rows, faiss_segments=faiss_list,
                             settings=settings)
        _fault("after_optimize_commit")
        self._load(self.manifest.snapshot())
        keep = set(self._faiss) | {self.settings.get("template", "")}
        for name in old - keep:  # readers holding these keep their open memory maps
            if name:
                (self.directory / FAISS_DIR / name).unlink(missing_ok=True)

    def _retrain(self, recipe: str) -> dict:
        """Train ``recipe`` on a sample of the stored vectors, re-encode every live row into one
        segment, and tune nprobe for TARGET_RECALL against exact search. One commit."""
        faiss_list, settings, done = self._encode_all(recipe)
        self._commit_faiss(faiss_list, settings)
        return done

    def _encode_all(self, recipe: str, exclude: Sequence[int] = ()) -> tuple[list, dict, dict]:
        """New FAISS files holding every live row but ``exclude`` with ``recipe`` (written, not yet
        committed): (FAISS segment list, settings, what was done)."""
        gen = self.generation + 1
        rows, vecs = self._live_rows_in(0, self.n_rows)
        if len(exclude):
            keep = ~np.isin(rows, np.asarray(exclude, dtype=np.int64))
            rows, vecs = rows[keep], vecs[keep]
        template = vector_index.new_segment_index(recipe, self.config.dim)
        if not template.is_trained:
            n_train = min(len(rows), max(vector_index.training_rows(recipe), 64 * vector_index.n_lists(recipe)))
            sample = np.random.default_rng(gen).choice(len(rows), n_train, replace=False)
            logger.info("training FAISS recipe %s on %d of %d vectors", recipe, n_train, len(rows))
            vector_index.use_gpu_for_training(template)
            template.train(np.ascontiguousarray(vecs[np.sort(sample)]))
        settings = {k: v for k, v in self.settings.items() if k not in ("nprobe", "ef_search", "template")}
        settings["recipe"] = recipe
        if template.is_trained and vector_index.training_rows(recipe):
            tname = f"template-g{gen}.index"
            self._write_faiss(template, tname)
            settings["template"] = tname
        index = vector_index.faiss.clone_index(template)
        for s in range(0, len(rows), 100_000):
            index.add_with_ids(np.ascontiguousarray(vecs[s:s + 100_000]), rows[s:s + 100_000])
        name = f"seg-{0:012d}-g{gen}.index"
        self._write_faiss(index, name)
        recall = None
        knob = "nprobe" if vector_index.n_lists(recipe) else "ef_search" if "HNSW" in recipe else None
        if knob and len(rows):
            settings[knob], recall = tune_recall(index, rows, vecs, recipe, knob, k=10, target=TARGET_RECALL,
                                                 refine=vector_index.needs_refine(recipe))
        logger.info("FAISS recipe %s (nprobe %s, efSearch %s, recall@10 %s)", recipe, settings.get("nprobe"),
                    settings.get("ef_search"), recall)
        return ([(name, recipe, 0, self.n_rows)], settings,
                {"action": "retrain", "recipe": recipe, "nprobe": settings.get("nprobe"),
                 "ef_search": settings.get("ef_search"), "recall_at_10": recall})

    # ------------------------------------------------------------------------ verify, repair
    def verify(self) -> list[str]:
        """Every check that needs no model: manifest against FAISS and the stored vectors for every
        row, every vector and token segment present and of the right length. [] = healthy."""
        problems = []
        for arr in [self._vectors, *self.tokens.arrays.values()]:
            for start, count in arr.segments:
                try:
                    arr.check_segment(start, count)
                except IndexCorrupt as e:
                    problems.append(str(e).split(" (run")[0])
        max_row, live = self.manifest.count_rows()
        if max_row > self.n_rows:
            problems.append(f"manifest names rows up to {max_row - 1}, only {self.n_rows} are committed")
        if live != len(self):
            problems.append(f"manifest has {live} live rows, its state says {len(self)}")
        dead = set(self.tombstones.tolist())
        seen = np.zeros(self.n_rows, dtype=bool)
        for name, _recipe, first, end in self.snapshot.faiss_segments:
            index = self._faiss[name]
            ids = vector_index.segment_ids(index)
            if ids.size and (ids.min() < first or ids.max() >= end):
                problems.append(f"FAISS segment {name} holds rows outside [{first}, {end})")
                continue
            if np.any(seen[ids]):
                problems.append(f"FAISS segment {name} repeats rows held by another segment")
            seen[ids] = True
            problems += self._compare_codes(name, index)
        live_rows = np.array([e.row for e in self.iter_entries()], dtype=np.int64)
        missing = live_rows[~seen[live_rows]] if live_rows.size else live_rows
        if missing.size:
            problems.append(f"{missing.size} live rows are missing from FAISS (first: {missing[:5].tolist()})")
        extra = np.nonzero(seen)[0]
        extra = extra[~np.isin(extra, live_rows)]
        extra = [r for r in extra.tolist() if r not in dead]
        if extra:
            problems.append(f"FAISS holds {len(extra)} rows the manifest does not list (first: {extra[:5]})")
        return problems

    def _compare_codes(self, name: str, index) -> list[str]:
        """Stored vectors against what FAISS holds, for every row, where the codes are exact floats."""
        try:
            got = vector_index.exact_contents(index, self.config.dim)
            if got is None:
                return []  # lossy codes (PQ, SQ) or a graph: ids were checked, vectors cannot be compared exactly
            ids, held = got
            if not ids.size:
                return []
            stored = self.vectors(ids)
        except IndexCorrupt as e:
            return [str(e).split(" (run")[0]]
        if not np.allclose(stored, held, atol=1e-5):
            bad = ids[~np.all(np.isclose(stored, held, atol=1e-5), axis=1)]
            return [f"FAISS vectors differ from the stored embeddings for {bad.size} rows "
                    f"(first: {bad[:5].tolist()}) in {name}"]
        return []

    def repair(self) -> RepairReport:
        """Drop rows whose vectors or tokens are unreadable (listed, so build-index embeds them
        again), rebuild FAISS from the stored vectors, remove stray files. One commit: a reader
        sees the damaged generation or the repaired one, never one without FAISS."""
        self._require_lock(repairing=True)
        report = RepairReport()
        snap = self.manifest.snapshot()
        self.snapshot = snap
        arrays = {"vectors": self._vectors, **self.tokens.arrays}
        self._check_config_against_segments(arrays, snap)
        lost: list[tuple[int, int]] = []
        replaced: list[tuple[str, int, int]] = []
        for store, arr in arrays.items():
            arr.set_segments(snap.segments.get(store, ()))
            for start, count in arr.segments:
                try:
                    arr.check_segment(start, count)
                except IndexCorrupt:
                    lost.append((start, count))
        for start, count in sorted(set(lost)):
            for store, arr in arrays.items():  # keep the rows tiled: an unreadable range becomes zeros, never live
                if (start, count) in arr.segments:
                    arr.write_segment(start, np.zeros((count, *arr.row_shape), arr.dtype))
                    replaced.append((store, start, count))
        dead_rows = [e.row for e in self.manifest.iter_live(snap.generation)
                     if any(s <= e.row < s + n for s, n in lost)]
        report.dropped = sorted(self.manifest.paths_of_rows(dead_rows, snap.generation).values())
        self.tombstones = np.union1d(self.tombstones, np.asarray(dead_rows, dtype=np.int64))
        n_live = len(self) - len(dead_rows)
        target = self.config.factory if self.config.factory != vector_index.AUTO else \
            vector_index.choose_recipe(n_live, self.config.dim)
        if vector_index.training_rows(target) > n_live:
            target = "Flat"
        report.removed_files = self._remove_stray_files()  # debris of crashed commits, before writing anew
        faiss_list, settings, _ = self._encode_all(target, exclude=dead_rows)
        self.manifest.commit(generation=snap.generation + 1, n_rows=snap.n_rows, removed=dead_rows,
                             add_segments=replaced, faiss_segments=faiss_list, settings=settings)
        self._faiss = {}
        self._load(self.manifest.snapshot())
        self._remove_stray_files()  # the FAISS files this commit replaced
        report.rebuilt_faiss = True
        logger.info("repair: %s", report.summary())
        return report

    def _check_config_against_segments(self, arrays: dict, snap: Snapshot) -> None:
        """Refuse to repair when index.json, not the data, is what changed: if every segment of a
        store is readable but of another row shape than the config implies, dropping its rows
        would destroy an intact index."""
        for store, arr in arrays.items():
            problems = []
            for start, count in snap.segments.get(store, []):
                try:
                    arr.check_segment(start, count)
                except IndexCorrupt as e:
                    problems.append(str(e))
                else:
                    break  # one segment agrees with the config: for this store the config is right
            else:
                if problems and all(" holds rows of shape " in m for m in problems):
                    raise IndexCorrupt(f"{CONFIG_FILE} disagrees with every stored {store} segment "
                                       f"({problems[0].split(' (run')[0]}); restore {CONFIG_FILE} instead of repairing")

    def info(self) -> dict:
        cfg = self.config
        return {
            "index": str(self.directory), "images": len(self), "rows": self.n_rows, "generation": self.generation,
            "factory": cfg.factory, "recipe": self.recipe, "nprobe": self.settings.get("nprobe"),
            "faiss_segments": len(self._faiss), "dim": cfg.dim, "tokens_per_image": cfg.tokens_per_image,
            "token_width": cfg.token_width, "token_dtype": cfg.token_dtype,
            "store": cfg.store_url or "(inside the index)", "model": cfg.model_path,
            "model_fingerprint": cfg.model_fingerprint,
        }


def record_model_path(store: "IndexStore", model_dir: Path) -> None:
    """Point the index at ``model_dir`` (relative when inside the index), e.g. after the model moved.
    Called with the writer lock held."""
    model_dir = Path(model_dir).resolve()
    try:
        path = str(model_dir.relative_to(store.directory.resolve()))
    except ValueError:
        path = str(model_dir)
    store.config = dataclasses.replace(store.config, model_path=path)
    save_config(store.config, store.directory / CONFIG_FILE)


def resolve_model_path(store: "IndexStore") -> Path:
    """The index's model directory: relative paths are inside the index (so it can move)."""
    p = Path(store.config.model_path)
    return p if p.is_absolute() else store.directory / p


def verify_index(directory: str | Path) -> list[str]:
    """Everything that can be checked without loading the model (no torch import): the store's
    verify() plus the model's weights against the fingerprint the index was built with."""
    from ..models.info import read_bundle_info, tensor_fingerprint

    try:
        store = IndexStore.open(directory)
    except IndexCorrupt as e:
        return [str(e)]
    problems = store.verify()
    model_dir = resolve_model_path(store)
    if not model_dir.is_dir():
        problems.append(f"the model this index was built with is gone: {model_dir}")
    else:
        try:
            read_bundle_info(model_dir)
            got = tensor_fingerprint(model_dir)
        except (OSError, ValueError, TypeError) as e:
            problems.append(f"model {model_dir} is unreadable: {e}")
        else:
            if got != store.config.model_fingerprint:
                problems.append(f"model weights in {model_dir} have fingerprint {got}, the index was built "
                                f"with {store.config.model_fingerprint}")
    return problems


def index_info(directory: str | Path) -> dict:
    """What an index holds and which model built it, read without loading the model (no torch)."""
    from ..models.info import read_bundle_info
    from .token_store import bytes_per_image

    store = IndexStore.open(directory)
    data = store.info()
    cfg = store.config
    data["bytes_per_image"] = bytes_per_image(cfg.tokens_per_image, cfg.token_width, cfg.token_dtype)
    try:
        bundle = read_bundle_info(resolve_model_path(store))
    except (OSError, ValueError, TypeError) as e:
        data["model_name"] = f"(unreadable: {e})"
    else:
        data["model_name"], data["fusion_weight"] = bundle.name, bundle.fusion_weight
    return data


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
        return load_config(IndexConfig, directory / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise IndexCorrupt(f"index at {directory} is corrupt: {e}") from e


def tune_recall(index, rows: np.ndarray, vectors: np.ndarray, recipe: str, knob: str, *, k: int, target: float,
                refine: bool, n_queries: int = 200, seed: int = 0) -> tuple[int, float]:
    """Smallest power of two for ``knob`` (IVF ``nprobe`` or HNSW ``ef_search``) whose recall@k
    against exact search reaches ``target`` (like faiss.contrib's operating points, one target).

    ``rows`` (sorted) are the ids of ``vectors``. Queries are stored vectors with noise added
    (a query is near, not equal to, an image).
    """
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    q = vectors[pick] + rng.normal(0, 0.5 / np.sqrt(vectors.shape[1]), (len(pick), vectors.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = rows[vector_index.exact_top_k(vectors, q, k)]
    value, top = (1, vector_index.n_lists(recipe)) if knob == "nprobe" else (16, 4096)
    while True:
        want = k * REFINE_FACTOR if refine else k
        _, got = vector_index.search_segments([index], q, want, **{knob: value})
        if refine:  # exact re-score of the candidates, as IndexStore.search does
            pos = np.searchsorted(rows, np.clip(got, 0, None))
            exact = np.einsum("qd,qkd->qk", q, vectors[np.clip(pos, 0, len(rows) - 1)])
            exact[got < 0] = -np.inf
            got = np.take_along_axis(got, np.argsort(-exact, axis=1)[:, :k], 1)
        recall = float(np.mean([len(set(g[:k].tolist()) & set(t.tolist())) / k for g, t in zip(got, truth)]))
        if recall >= target or value >= top:
            return value, recall
        value *= 2

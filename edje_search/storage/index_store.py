"""The on-disk index: config, committed state, vectors, tokens, FAISS file and manifest.

Layout of an index directory::

    index.json            IndexConfig (recipe, widths, model fingerprint)
    state.json            the committed generation: {"generation": g, "n_rows": N}
    vectors.zarr/         (N, E) float32 first-stage embeddings (source of truth for FAISS)
    tokens.zarr/          (N, m, d) float16 adapter outputs
    faiss-<g>.index       FAISS index of the live rows of generation g (ids = row numbers)
    manifest-<g>.jsonl    one line per live row: row, path, sha256
    skipped.jsonl         files the last build could not use, with the reason

A commit appends rows to the arrays, writes the generation's FAISS file and manifest, then
renames state.json into place. Rows beyond the committed ``n_rows`` are ignored (and
overwritten by the next commit), so a crash at any moment leaves the last commit intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..config import IndexConfig, load_config, save_config
from . import vector_index
from .token_store import ZarrTokenStore, create_token_store, open_token_store

CONFIG_FILE = "index.json"
STATE_FILE = "state.json"


class IndexError_(RuntimeError):
    """The index directory is missing, incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    row: int
    path: str
    sha256: str
    size: int = -1  # file size and mtime when indexed: a cheap "has it changed?" check
    mtime_ns: int = -1


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexStore:
    """Reads and commits one index directory."""

    @property
    def entries(self) -> list[ManifestEntry]:
        """Live images of the committed generation, in manifest order."""
        return self._entries

    @entries.setter
    def entries(self, entries: list[ManifestEntry]) -> None:
        self._entries = entries
        # built once per generation: searches look paths up by row without scanning the manifest
        self.path_of_row: dict[int, str] = {e.row: e.path for e in entries}

    def __init__(self, directory: Path, config: IndexConfig, generation: int, n_rows: int,
                 mode: str = "r"):
        self.directory = directory
        self.config = config
        self.generation = generation
        self.n_rows = n_rows  # committed rows in the arrays (live or removed)
        self.mode = mode
        self.tokens = open_token_store(directory / "tokens.zarr", mode="r" if mode == "r" else "r+")
        self._vectors = ZarrTokenStore.open(directory / "vectors.zarr", mode="r" if mode == "r" else "r+")
        self.entries = self._read_manifest()
        self.faiss = vector_index.read_index(self._faiss_path(generation)) if generation > 0 else \
            vector_index.new_index(config.factory, config.dim)

    # ------------------------------------------------------------------------------- creation
    @classmethod
    def create(cls, directory: str | Path, config: IndexConfig) -> "IndexStore":
        directory = Path(directory)
        if (directory / CONFIG_FILE).exists():
            raise FileExistsError(f"an index already exists in {directory}")
        vector_index.new_index(config.factory, config.dim)  # validate the factory string early
        directory.mkdir(parents=True, exist_ok=True)
        create_token_store(directory / "tokens.zarr", config.tokens_per_image, config.token_width,
                           dtype=config.token_dtype, chunk_rows=config.chunk_rows)
        ZarrTokenStore.create(directory / "vectors.zarr", 1, config.dim, dtype="float32", chunk_rows=1024)
        _atomic_write_text(directory / STATE_FILE, json.dumps({"generation": 0, "n_rows": 0}) + "\n")
        save_config(config, directory / CONFIG_FILE)  # written last: its presence marks an index
        return cls(directory, config, 0, 0, mode="r+")

    @classmethod
    def open(cls, directory: str | Path, mode: str = "r") -> "IndexStore":
        directory = Path(directory)
        if not directory.is_dir():
            raise IndexError_(f"no index at {directory} (build one with `edje-search build-index`)")
        if not (directory / CONFIG_FILE).is_file():
            raise IndexError_(f"{directory} is not an edje-search index (no {CONFIG_FILE})")
        for attempt in range(5):
            try:
                config = load_config(IndexConfig, directory / CONFIG_FILE)
                state = cls.read_state(directory)
                store = cls(directory, config, int(state["generation"]), int(state["n_rows"]), mode=mode)
                break
            except FileNotFoundError as e:
                # a writer committed between our reading state.json and opening its files: retry
                if attempt == 4:
                    raise IndexError_(f"index at {directory} is incomplete: {e}") from e
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                raise IndexError_(f"index at {directory} is corrupt: {e}") from e
        if mode != "r":
            store._recover()
        return store

    def _recover(self) -> None:
        """Undo what an interrupted commit left behind: rows past the commit, orphan generations."""
        self.tokens.truncate(self.n_rows)
        self._vectors.truncate(self.n_rows)
        keep = {self._faiss_path(self.generation).name, self._manifest_path(self.generation).name}
        for pattern in ("faiss-*.index*", "manifest-*.jsonl*", "*.tmp"):
            for p in self.directory.glob(pattern):
                if p.name not in keep:
                    p.unlink(missing_ok=True)

    @staticmethod
    def read_state(directory: str | Path) -> dict:
        return json.loads((Path(directory) / STATE_FILE).read_text())

    # -------------------------------------------------------------------------------- reading
    def _faiss_path(self, generation: int) -> Path:
        return self.directory / f"faiss-{generation}.index"

    def _manifest_path(self, generation: int) -> Path:
        return self.directory / f"manifest-{generation}.jsonl"

    def _read_manifest(self) -> list[ManifestEntry]:
        if self.generation == 0:
            return []
        with open(self._manifest_path(self.generation), encoding="utf-8") as f:
            return [ManifestEntry(**json.loads(line)) for line in f if line.strip()]

    def __len__(self) -> int:
        """Number of live (searchable) images."""
        return len(self.entries)

    def vectors(self, rows) -> np.ndarray:
        """First-stage embeddings (k, E) of the given rows."""
        return self._vectors.get(rows)[:, 0]

    def verify(self) -> list[str]:
        """Check that manifest, FAISS ids and arrays agree; returns the problems found (empty = healthy)."""
        problems = []
        rows = [e.row for e in self.entries]
        if len(set(rows)) != len(rows):
            problems.append("manifest lists a row more than once")
        paths = [e.path for e in self.entries]
        if len(set(paths)) != len(paths):
            problems.append("manifest lists a path more than once")
        if rows and (min(rows) < 0 or max(rows) >= self.n_rows):
            problems.append(f"manifest rows outside the committed range [0, {self.n_rows})")
        if len(self.tokens) < self.n_rows:
            problems.append(f"token store has {len(self.tokens)} rows, {self.n_rows} committed")
        if len(self._vectors) < self.n_rows:
            problems.append(f"vector store has {len(self._vectors)} rows, {self.n_rows} committed")
        if self.faiss.ntotal != len(self.entries):
            problems.append(f"FAISS holds {self.faiss.ntotal} vectors, manifest {len(self.entries)} images")
        elif self.entries:
            if set(vector_index.row_ids(self.faiss).tolist()) != set(rows):
                problems.append("FAISS ids differ from manifest rows")
            else:
                live = np.array(rows[: min(len(rows), 256)])
                try:
                    indexed = np.stack([self.faiss.reconstruct(int(r)) for r in live])
                except RuntimeError:
                    indexed = None  # this index type cannot give vectors back (e.g. IVF without a direct map)
                if indexed is not None and not np.allclose(self.vectors(live), indexed, atol=1e-4):
                    problems.append("FAISS vectors differ from the stored embeddings")
        return problems

    # ------------------------------------------------------------------------------ committing
    def commit(self, new_paths: list[str], new_hashes: list[str], vectors: np.ndarray,
               tokens: np.ndarray, removed_rows: Iterable[int] = (),
               new_stats: list[tuple[int, int]] | None = None) -> None:
        """Append rows for ``new_paths`` and drop ``removed_rows``, atomically.

        ``new_stats`` gives (size, mtime_ns) per new path, used to notice changed files later.
        """
        if self.mode == "r":
            raise IndexError_("index opened read-only")
        removed = set(int(r) for r in removed_rows)
        start = self.n_rows
        b = len(new_paths)
        if not (len(new_hashes) == b == vectors.shape[0] == tokens.shape[0]):
            raise ValueError("commit: paths, hashes, vectors and tokens disagree in length")
        if b:
            self.tokens.write(start, tokens)
            self._vectors.write(start, vectors[:, None, :])
        rows = np.arange(start, start + b, dtype=np.int64)
        live = [e.row for e in self.entries if e.row not in removed]
        if removed:
            try:
                self.faiss.remove_ids(np.fromiter(removed, dtype=np.int64))
            except RuntimeError:
                # index types that cannot remove (HNSW, ...): rebuild from the stored vectors
                self.faiss = vector_index.new_index(self.config.factory, self.config.dim)
                if live:
                    vector_index.add_vectors(self.faiss, self.vectors(live), np.array(live, dtype=np.int64))
        if b:
            vector_index.add_vectors(self.faiss, vectors, rows,
                                     all_vectors=None if self.faiss.is_trained else
                                     np.concatenate([self.vectors(live), vectors]) if live else vectors)
        entries = [e for e in self.entries if e.row not in removed]
        stats = new_stats or [(-1, -1)] * b
        entries += [ManifestEntry(int(r), p, h, int(st[0]), int(st[1]))
                    for r, p, h, st in zip(rows, new_paths, new_hashes, stats)]
        gen = self.generation + 1
        vector_index.write_index(self.faiss, self._faiss_path(gen))
        _atomic_write_text(self._manifest_path(gen),
                           "".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in entries))
        _atomic_write_text(self.directory / STATE_FILE,
                           json.dumps({"generation": gen, "n_rows": start + b}) + "\n")
        _fsync_dir(self.directory)
        old = self.generation
        self.generation, self.n_rows, self.entries = gen, start + b, entries
        if old > 0:  # readers holding the old generation keep their open file handles
            for p in (self._faiss_path(old), self._manifest_path(old)):
                p.unlink(missing_ok=True)

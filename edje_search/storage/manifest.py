"""The manifest: which row holds which file, in SQLite (WAL mode).

Why SQLite rather than Parquet/Arrow segments: the writer needs point lookups by path and by
content hash on every batch (is this file indexed? is this content already embedded?), and a
commit must change rows, segment lists and the generation counter together. SQLite gives
both from one file: B-tree indexes answer a lookup in microseconds at 10^8 rows without
loading anything, a transaction is the commit point, and WAL mode lets readers keep a
consistent snapshot while one writer commits. Parquet segments would need their own index
and their own commit protocol on top.

Rows are never deleted: a row records the generation that ``added`` it and the one that
``removed`` it, so a reader pinned to generation g sees exactly the rows live at g.
Paths are stored as bytes (``os.fsencode``) so any file name round-trips.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import IndexCorrupt

MANIFEST_FILE = "manifest.sqlite"
_PARAMS = 500  # bound parameters per IN (...) query, well below SQLite's limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    row INTEGER PRIMARY KEY, path BLOB NOT NULL, sha256 TEXT, size INTEGER, mtime_ns INTEGER,
    meta TEXT, added INTEGER NOT NULL, removed INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS rows_live_path ON rows(path) WHERE removed IS NULL;
CREATE INDEX IF NOT EXISTS rows_live_sha ON rows(sha256) WHERE removed IS NULL;
CREATE INDEX IF NOT EXISTS rows_removed ON rows(removed) WHERE removed IS NOT NULL;
CREATE TABLE IF NOT EXISTS segments (store TEXT NOT NULL, start INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (store, start));
CREATE TABLE IF NOT EXISTS faiss_segments (name TEXT PRIMARY KEY, recipe TEXT NOT NULL, first_row INTEGER NOT NULL,
    end_row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Checksums of the committed segment files (storage/checksums.py). Its own table, created by the
# first writer that opens an older index, so manifests written before it stay readable: a
# segment without a row here is "unchecked".
CHECKSUM_SCHEMA = """
CREATE TABLE IF NOT EXISTS segment_checksums (store TEXT NOT NULL, start INTEGER NOT NULL,
    file_crc TEXT NOT NULL, row_crcs BLOB NOT NULL, PRIMARY KEY (store, start));
"""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    row: int
    path: str
    sha256: str | None
    size: int = -1  # file size and mtime when indexed: a cheap "has it changed?" check
    mtime_ns: int = -1
    meta: dict | None = None  # caption and other metadata given at ingestion


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a reader sees of one committed generation."""

    generation: int
    n_rows: int  # one past the last row ever committed (live or removed; rows between commits are gaps)
    n_live: int
    segments: dict[str, list[tuple[int, int]]]  # store name -> [(first row, count)]
    faiss_segments: list[tuple[str, str, int, int]]  # (file name, recipe, first row, end row)
    settings: dict  # recipe state (trained recipe, nprobe, ...)


def _entry(r) -> ManifestEntry:
    return ManifestEntry(int(r[0]), os.fsdecode(r[1]), r[2], int(r[3]), int(r[4]), json.loads(r[5]) if r[5] else None)


_COLS = "row, path, sha256, size, mtime_ns, meta"


def prefix_end(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string starting with ``prefix`` (None-free:
    a prefix of only 0xFF bytes has no such bound, so it gets one far past any path)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return prefix + b"\xff" * 4096
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _read_only_folder(path: Path) -> bool:
    """True when a reader cannot use WAL mode's shared-memory file: the folder is not writable
    (a read-only mount, or permissions) and no writer left ``-wal``/``-shm`` files to share.
    SQLite then opens the database only as ``immutable`` (its documented way to read a WAL
    database on read-only media); with no ``-wal`` file every commit is in the main file, and
    nothing can write to the folder meanwhile."""
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    if wal.exists() and shm.exists():
        return False
    return not os.access(path.parent, os.W_OK) or _on_read_only_mount(path.parent)


def _on_read_only_mount(folder: Path) -> bool:
    """os.access says nothing of a read-only mount to root; statvfs's ST_RDONLY flag does."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _chunks(items: Sequence, n: int = _PARAMS) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Manifest:
    """One SQLite connection to an index's manifest (thread-safe by a lock; cheap to open)."""

    def __init__(self, path: str | Path, *, readonly: bool = True, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise IndexCorrupt(f"manifest missing: {self.path}")
        uri = f"file:{self.path}?mode={'ro' if readonly else 'rwc'}"
        if readonly and _read_only_folder(self.path):
            uri += "&immutable=1"
        try:
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
            if not readonly:  # IF NOT EXISTS throughout: also restores indexes a repair dropped
                self._db.executescript(SCHEMA + CHECKSUM_SCHEMA)
        except sqlite3.OperationalError as e:  # the file is fine, but cannot be opened as asked
            hint = "; is the disk full?" if not readonly and "disk" in str(e) else ""
            raise IndexCorrupt(f"manifest {self.path} cannot be opened {'for reading' if readonly else 'for writing'}: "
                               f"{e}{hint}") from e
        except sqlite3.DatabaseError as e:
            raise IndexCorrupt(f"manifest {self.path} is unreadable: {e}") from e
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    def _q(self, sql: str, params: Sequence = ()) -> list:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"manifest {self.path}: {e}") from e

    def select(self, sql: str, params: Sequence = ()) -> list:
        """Rows of one read query on the manifest (its ``rows`` table: row, path, sha256, size,
        mtime_ns, meta, added, removed), with bound ``params``; for modules that compile their own
        conditions (filters, duplicates). Runs under SQLite's ``query_only``, so it cannot write."""
        with self._lock:
            self._db.execute("PRAGMA query_only = 1")
            try:
                return self._q(sql, params)
            finally:
                self._db.execute("PRAGMA query_only = 0")

    def ensure_index(self, name: str, expression: str) -> None:
        """``CREATE INDEX IF NOT EXISTS name ON rows(expression)``: an index a reader's queries
        need (filters' expression indexes). ``name`` and ``expression`` are fixed strings of the
        caller's code, never user input."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"not an index name: {name!r}")
        with self._lock:
            try:
                self._db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON rows({expression})")
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"manifest {self.path}: {e}") from e

    # -------------------------------------------------------------------------------- reading
    def snapshot(self) -> Snapshot:
        """The latest committed generation, read in one transaction."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    state = dict(self._db.execute("SELECT key, value FROM state").fetchall())
                    segs: dict[str, list[tuple[int, int]]] = {}
                    for store, start, count in self._db.execute(
                            "SELECT store, start, count FROM segments ORDER BY store, start"):
                        segs.setdefault(store, []).append((int(start), int(count)))
                    faiss_segs = [(n, r, int(a), int(b)) for n, r, a, b in self._db.execute(
                        "SELECT name, recipe, first_row, end_row FROM faiss_segments ORDER BY first_row")]
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"manifest {self.path}: {e}") from e
        if "generation" not in state:
            raise IndexCorrupt(f"manifest {self.path} has no committed state")
        return Snapshot(int(state["generation"]), int(state["n_rows"]), int(state["n_live"]), segs, faiss_segs,
                        json.loads(state.get("settings", "{}")))

    def generation(self) -> int:
        got = self._q("SELECT value FROM state WHERE key='generation'")
        return int(got[0][0]) if got else 0

    @staticmethod
    def live_condition(g: int) -> str:
        """SQL condition on ``rows`` for the rows live at generation ``g`` (for :meth:`select`)."""
        return f"added <= {int(g)} AND (removed IS NULL OR removed > {int(g)})"

    _live = live_condition  # the name this module's own queries use

    def paths_of_rows(self, rows: Iterable[int], generation: int) -> dict[int, str]:
        """Paths of those ``rows`` that are live at ``generation``."""
        rows = [int(r) for r in rows]
        out: dict[int, str] = {}
        for part in _chunks(rows):
            q = f"SELECT row, path FROM rows WHERE {self._live(generation)} AND row IN ({','.join('?' * len(part))})"
            out.update((int(r), os.fsdecode(p)) for r, p in self._q(q, part))
        return out

    def entries_of_rows(self, rows: Iterable[int]) -> dict[int, ManifestEntry]:
        rows = [int(r) for r in rows]
        out = {}
        for part in _chunks(rows):
            q = f"SELECT {_COLS} FROM rows WHERE row IN ({','.join('?' * len(part))})"
            out.update((int(r[0]), _entry(r)) for r in self._q(q, part))
        return out

    def lookup_paths(self, paths: Sequence[str], generation: int) -> dict[str, ManifestEntry]:
        """Live entries (at ``generation``) of those of ``paths`` that are indexed."""
        out = {}
        keys = [os.fsencode(p) for p in paths]
        for part in _chunks(keys):
            q = f"SELECT {_COLS} FROM rows WHERE {self._live(generation)} AND path IN ({','.join('?' * len(part))})"
            for r in self._q(q, part):
                e = _entry(r)
                out[e.path] = e
        return out

    def row_of_hash(self, sha256: str, generation: int) -> int | None:
        got = self._q(f"SELECT row FROM rows WHERE {self._live(generation)} AND sha256 = ? LIMIT 1", (sha256,))
        return int(got[0][0]) if got else None

    def live_under(self, prefix: str, generation: int) -> Iterator[ManifestEntry]:
        """Live entries whose path starts with ``prefix`` (a range scan on the path index)."""
        lo = os.fsencode(prefix)
        hi = prefix_end(lo)
        yield from (_entry(r) for r in self._q(
            f"SELECT {_COLS} FROM rows WHERE {self._live(generation)} AND path >= ? AND path < ? ORDER BY row",
            (lo, hi)))

    def iter_live(self, generation: int, batch: int = 100_000) -> Iterator[ManifestEntry]:
        """Every live entry in row order, read in pages (verification, rebuilds)."""
        last = -1
        while True:
            page = self._q(f"SELECT {_COLS} FROM rows WHERE {self._live(generation)} AND row > ? "
                           f"ORDER BY row LIMIT {int(batch)}", (last,))
            if not page:
                return
            yield from (_entry(r) for r in page)
            last = int(page[-1][0])

    def removed_rows(self, generation: int) -> list[int]:
        """Rows removed at or before ``generation`` (tombstones for search)."""
        return [int(r[0]) for r in self._q(
            "SELECT row FROM rows WHERE removed IS NOT NULL AND removed <= ?", (int(generation),))]

    def segment_checksums(self) -> dict[tuple[str, int], tuple[str, bytes]]:
        """(store, first row) -> (file checksum, row checksums) of every checksummed segment;
        empty for a manifest written before checksums were recorded."""
        if not self._q("SELECT 1 FROM sqlite_master WHERE type='table' AND name='segment_checksums'"):
            return {}
        return {(s, int(a)): (f, bytes(r)) for s, a, f, r in
                self._q("SELECT store, start, file_crc, row_crcs FROM segment_checksums")}

    def count_rows(self) -> tuple[int, int]:
        """(rows in the table, live rows) by counting: verification only."""
        total = self._q("SELECT COUNT(*), COALESCE(MAX(row) + 1, 0) FROM rows")[0]
        live = self._q("SELECT COUNT(*) FROM rows WHERE removed IS NULL")[0][0]
        return int(total[1]), int(live)

    # -------------------------------------------------------------------------------- writing
    def commit(self, *, generation: int, n_rows: int, new: Sequence[ManifestEntry] = (),
               removed: Sequence[int] = (), add_segments: Sequence[tuple[str, int, int]] = (),
               drop_segments: Sequence[tuple[str, int]] = (),
               faiss_segments: Sequence[tuple[str, str, int, int]] | None = None,
               settings: dict | None = None,
               checksums: Sequence[tuple[str, int, str, bytes]] = ()) -> None:
        """Make ``generation`` the committed state in one transaction (the commit point).

        ``faiss_segments``, when given, replaces the list of FAISS segment files; ``checksums``
        gives (store, first row, file checksum, row checksums) of the segments written.
        """
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    prev = self.generation()
                    if prev + 1 != generation:
                        raise IndexCorrupt(f"commit of generation {generation} on top of {prev}: another writer?")
                    n_live = int(db.execute("SELECT value FROM state WHERE key='n_live'").fetchone()[0])
                    for part in _chunks(list(removed)):
                        n_live -= db.execute(f"UPDATE rows SET removed = ? WHERE removed IS NULL AND row IN "
                                             f"({','.join('?' * len(part))})", (generation, *part)).rowcount
                    db.executemany(
                        "INSERT INTO rows (row, path, sha256, size, mtime_ns, meta, added) VALUES (?,?,?,?,?,?,?)",
                        [(e.row, os.fsencode(e.path), e.sha256, e.size, e.mtime_ns,
                          json.dumps(e.meta) if e.meta else None, generation) for e in new])
                    db.executemany("DELETE FROM segments WHERE store = ? AND start = ?", drop_segments)
                    db.executemany("DELETE FROM segment_checksums WHERE store = ? AND start = ?", drop_segments)
                    db.executemany("INSERT OR REPLACE INTO segment_checksums VALUES (?,?,?,?)", checksums)
                    db.executemany("INSERT OR REPLACE INTO segments (store, start, count) VALUES (?,?,?)",
                                   add_segments)
                    if faiss_segments is not None:
                        db.execute("DELETE FROM faiss_segments")
                        db.executemany("INSERT INTO faiss_segments VALUES (?,?,?,?)", faiss_segments)
                    n_live += len(new)
                    values = {"generation": generation, "n_rows": n_rows, "n_live": n_live}
                    if settings is not None:
                        values["settings"] = json.dumps(settings, sort_keys=True)
                    db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                                   [(k, str(v) if not isinstance(v, str) else v) for k, v in values.items()])
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                raise IndexCorrupt(f"manifest refused the commit: {e}") from e
            except sqlite3.OperationalError as e:  # SQLite rolled back: the previous generation stands
                if "full" in str(e):
                    raise OSError(errno.ENOSPC, "No space left on device (the commit was rolled back)",
                                  str(self.path)) from e
                raise IndexCorrupt(f"manifest {self.path}: the commit failed and was rolled back: {e}") from e

    def update_meta(self, meta_of_rows: dict[int, dict]) -> None:
        """Replace the metadata of existing rows, in one transaction. Metadata is not versioned by
        generation: filling in fields an older build did not collect changes no search result."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("UPDATE rows SET meta = ? WHERE row = ?",
                                         [(json.dumps(m) if m else None, int(r)) for r, m in meta_of_rows.items()])
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"manifest {self.path}: {e}") from e

    def initialise(self, settings: dict | None = None) -> None:
        """Generation 0: no rows, no segments."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                                 [("generation", "0"), ("n_rows", "0"), ("n_live", "0"),
                                  ("settings", json.dumps(settings or {}, sort_keys=True))])
            self._db.execute("COMMIT")


class ManifestCheck:
    """SQL for checking and restoring a manifest's own integrity (storage/manifest_check.py)."""

    def __init__(self, manifest: Manifest):
        self.m = manifest

    def integrity_check(self) -> list[str]:
        """SQLite's own check of every page, B-tree and index against its table; [] = ok."""
        got = [str(r[0]) for r in self.m._q("PRAGMA integrity_check")]
        return [] if got == ["ok"] else got

    def live_rows_by_scan(self) -> list[tuple[int, bytes, str | None, int, int]]:
        """(row, path, sha256, size, mtime_ns) of rows not removed, read from the table itself
        (NOT INDEXED: a damaged index must not decide what is found)."""
        return [(int(r), bytes(p), h, int(s), int(t)) for r, p, h, s, t in self.m._q(
            "SELECT row, path, sha256, size, mtime_ns FROM rows NOT INDEXED WHERE removed IS NULL ORDER BY row")]

    def drop_indexes(self) -> None:
        """Drop the secondary indexes, so that a repair commit does not trip over a damaged one;
        the next writable open (or :meth:`rebuild_indexes`) builds them again from the table."""
        for (name,) in self.m._q("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='rows' "
                                 "AND sql IS NOT NULL"):
            self.m._q(f'DROP INDEX "{name}"')

    def rebuild_indexes(self) -> None:
        with self.m._lock:
            try:
                self.m._db.executescript(SCHEMA)
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"manifest {self.m.path}: indexes cannot be rebuilt: {e}") from e


class HashLookup:
    """``sha256 in lookup``: is this content live in the index? Picklable, so DataLoader workers
    can skip decoding files whose content is already embedded without a copy of every hash."""

    def __init__(self, manifest_path: str | Path, generation: int):
        self.manifest_path = str(manifest_path)
        self.generation = generation
        self._m: Manifest | None = None

    def __getstate__(self):
        return {"manifest_path": self.manifest_path, "generation": self.generation, "_m": None}

    def __contains__(self, sha256: object) -> bool:
        if not isinstance(sha256, str) or self.generation == 0:
            return False
        if self._m is None:
            self._m = Manifest(self.manifest_path)
        return self._m.row_of_hash(sha256, self.generation) is not None

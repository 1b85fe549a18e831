"""Append-only row segments: the on-disk (or object-storage) home of the first-stage vectors.

Each commit writes its rows as one immutable ``.npy`` file named by its first row
(``000000001024.npy``); files are never modified after they are written, so the same code
works on a local disk and on any fsspec URL (``s3://bucket/prefix``), and a half-written
commit leaves only a file that no committed generation names. Which segments exist is
recorded by the manifest in the commit's transaction, never by listing a folder. Segments need
not tile the rows: row numbers between commits that the token store skips (token_store.py) are
skipped here too.

The vectors stay in ``.npy`` segments (the tokens live in Zarr) because the two hot paths that
read them want plain memory: FAISS merges and retraining stream whole segments, and the exact
re-scoring of lossy FAISS codes reads a few hundred rows through a memory map, with no codec
pipeline in between.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import IndexCorrupt, IndexGone, StorageUnavailable
from ..fsutil import atomic_write_bytes
from .checksums import file_checksum, row_checksums
from .layout import CONFIG_FILE

logger = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


# Failures of access, not of the stored bytes: they must never make verify or repair drop rows.
# On a local disk these; from object storage every OSError but FileNotFoundError (a missing
# object, which is damage): fsspec's S3 client raises plain OSErrors for throttling and server
# errors too.
ACCESS_FAILURES = (PermissionError, ConnectionError, TimeoutError)


def is_access_failure(e: BaseException, remote: bool) -> bool:
    if isinstance(e, FileNotFoundError):
        return False
    return isinstance(e, ACCESS_FAILURES) or (remote and isinstance(e, OSError))


def unavailable(what: str, why: object) -> StorageUnavailable:
    """The error of a read the storage refused or failed (``why``: the failure or its text)."""
    return StorageUnavailable(f"cannot read {what}: {why} (check access to the storage; nothing stored is known "
                              f"to be damaged)")


def segment_name(start: int) -> str:
    return f"{start:012d}.npy"


def _header_and_offset(head: bytes) -> tuple[tuple, np.dtype, int]:
    """Parse an .npy header: (shape, dtype, data offset)."""
    f = io.BytesIO(head)
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran:
        raise IndexCorrupt("segment stored in Fortran order")
    return shape, dtype, f.tell()


class SegmentArray:
    """Rows of shape ``row_shape`` in per-commit ``.npy`` segments under ``url``.

    ``segments`` is the sorted list of (first row, row count) the manifest says are committed.
    """

    def __init__(self, url: str, row_shape: tuple[int, ...], dtype: str, segments: Sequence[tuple[int, int]] = ()):
        self.url = str(url)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.remote = is_remote(self.url)
        self._fs = None
        self._lock = threading.Lock()
        self._maps: dict[int, np.ndarray] = {}  # first row -> memory map (local) or data offset (remote)
        # first row -> (file checksum, row checksums) of segments written by this process and not
        # yet committed: the commit records them in the manifest with the segment (checksums.py)
        self.written: dict[int, tuple[str, bytes]] = {}
        self.set_segments(segments)

    # ------------------------------------------------------------------------------- layout
    def set_segments(self, segments: Sequence[tuple[int, int]]) -> None:
        self.segments = sorted((int(s), int(n)) for s, n in segments)
        self._starts = [s for s, _ in self.segments]
        end = 0
        for s, n in self.segments:
            if s < end:
                raise IndexCorrupt(f"{self.url}: segments overlap at row {s}")
            end = s + n
        self.n_rows = end

    def __len__(self) -> int:
        return self.n_rows

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.url)
        return self._fs

    def _path(self, start: int) -> str:
        return f"{self.url.rstrip('/')}/{segment_name(start)}"

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * self.dtype.itemsize

    # ------------------------------------------------------------------------------ writing
    def write_segment(self, start: int, rows: np.ndarray) -> tuple[int, int]:
        """Write ``rows`` (b, *row_shape) as the segment starting at ``start``; returns (start, b).

        Not visible to readers until the manifest commits the returned entry.
        """
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"segment rows have shape {rows.shape[1:]}, the store holds {self.row_shape}")
        buf = io.BytesIO()
        np.lib.format.write_array(buf, rows, allow_pickle=False)
        data = buf.getbuffer()
        self.written[start] = (file_checksum(data), row_checksums(rows))
        if self.remote:
            self.fs.pipe(self._path(start), bytes(data))  # one PUT: an object appears whole or not at all
        else:
            Path(self.url).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._path(start), data)
        self._maps.pop(start, None)
        return start, rows.shape[0]

    def delete_segments(self, starts: Sequence[int]) -> None:
        for s in starts:
            self._maps.pop(s, None)
            try:
                self.fs.rm(self._path(s)) if self.remote else os.unlink(self._path(s))
            except FileNotFoundError:
                pass

    def stray_files(self) -> list[str]:
        """Segment files present in storage that no committed segment names (left by a crash)."""
        known = {segment_name(s) for s in self._starts}
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.url, detail=False)] if self.remote else \
                os.listdir(self.url)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n not in known)

    def remove_stray_files(self) -> list[str]:
        stray = self.stray_files()
        for name in stray:
            path = f"{self.url.rstrip('/')}/{name}"
            try:
                self.fs.rm(path) if self.remote else os.unlink(path)
            except FileNotFoundError:
                pass
        if stray:
            logger.info("removed %d uncommitted segment files from %s", len(stray), self.url)
        return stray

    # ------------------------------------------------------------------------------ reading
    def _open(self, start: int, count: int):
        """Memory map (local) or data offset (remote) of a segment, checked against the manifest."""
        with self._lock:
            got = self._maps.get(start)
            if got is not None:
                return got
            path = self._path(start)
            try:
                if self.remote:
                    head = self.fs.cat_file(path, start=0, end=256)
                    size = self.fs.size(path)
                    shape, dtype, offset = _header_and_offset(head)
                    got = offset
                else:
                    got = np.load(path, mmap_mode="r", allow_pickle=False)
                    shape, dtype = got.shape, got.dtype
                    size = os.path.getsize(path)
                    offset = size - got.nbytes
            except FileNotFoundError as e:
                index_dir = Path(self.url).parent
                if not self.remote and not (index_dir / CONFIG_FILE).exists():  # the whole index went, not a file
                    raise IndexGone(f"index {index_dir} was removed (restore it or build it again)") from e
                raise IndexCorrupt(f"segment file missing: {path} (run `edje-search repair`)") from e
            except (ValueError, OSError) as e:
                if is_access_failure(e, self.remote):
                    raise unavailable(f"segment file {path}", e) from e
                raise IndexCorrupt(f"segment file unreadable: {path}: {e} (run `edje-search repair`)") from e
            if tuple(shape[1:]) != self.row_shape or dtype != self.dtype:
                raise IndexCorrupt(f"segment file {path} holds rows of shape {tuple(shape[1:])} {dtype}, the index "
                                   f"expects {self.row_shape} {self.dtype}")
            if shape[0] != count or size != offset + count * self.row_bytes:
                raise IndexCorrupt(f"segment file {path} is {size} bytes for {shape[0]} rows, expected "
                                   f"{offset + count * self.row_bytes} for {count} (run `edje-search repair`)")
            self._maps[start] = got
            return got

    def check_segment(self, start: int, count: int) -> None:
        """Raise IndexCorrupt unless the segment exists with the right header and length."""
        self._maps.pop(start, None)
        self._open(start, count)

    def unreadable_rows(self, start: int, count: int) -> tuple[list[int], str]:
        """All rows of the segment and why, when its file is missing or of the wrong length; ([], "")."""
        try:
            self.check_segment(start, count)
            return [], ""
        except StorageUnavailable:
            raise  # not damage: verify and repair stop here instead of dropping the segment's rows
        except IndexCorrupt as e:
            path = self._path(start)
            return list(range(start, start + count)), str(e).split(" (run")[0].split(": ", 1)[0].replace(f" {path}", "")

    def layout_mismatch(self, segments: Sequence[tuple[int, int]]) -> str | None:
        """How the stored segments disagree with the row shape and dtype the config implies, when
        every segment that can be read disagrees; None when one agrees or none can tell."""
        problems = []
        for start, count in segments:
            try:
                self.check_segment(start, count)
                return None
            except StorageUnavailable:
                raise
            except IndexCorrupt as e:
                problems.append(str(e))
        if problems and all(" holds rows of shape " in m for m in problems):
            return problems[0].split(" (run")[0]
        return None

    def read_checked(self, start: int, count: int) -> tuple[np.ndarray | None, list[int], str]:
        """(the segment's rows, [], "") or (None, all its rows, why): a segment file is read whole
        or not at all."""
        lost, why = self.unreadable_rows(start, count)
        return (None, lost, why) if lost else (np.asarray(self.read_segment(start, count)), [], "")

    def span_matches(self, start: int, rows: np.ndarray, checksum: str) -> bool:
        """Whether the segment file still has the checksum its commit recorded."""
        return file_checksum(self.read_file(start)) == checksum

    def rewrite_rows(self, lost: Sequence[int], starts: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Repair: write each segment holding a row of ``lost`` (and the segments starting at
        ``starts``) again with those rows zeroed (a segment that cannot be read at all is written
        as zeros); returns the segments written."""
        lost_set = {int(r) for r in lost}
        done = []
        for start, count in self.segments:
            mine = [r - start for r in lost_set if start <= r < start + count]
            if not mine and start not in starts:
                continue
            whole = len(mine) == count
            keep = np.zeros((count, *self.row_shape), self.dtype) if whole else self.read_segment(start, count).copy()
            keep[mine] = 0
            self.write_segment(start, keep)
            done.append((start, count))
        return done

    def path_of(self, start: int, rows: Sequence[int] = ()) -> str:
        """The segment file starting at ``start`` (``rows``, which it holds, add nothing)."""
        return self._path(start)

    def read_file(self, start: int) -> bytes:
        """The whole segment file, as stored (checksums)."""
        path = self._path(start)
        try:
            if self.remote:
                return self.fs.cat_file(path)
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            if is_access_failure(e, self.remote):
                raise unavailable(f"segment file {path}", e) from e
            raise IndexCorrupt(f"segment file unreadable: {path}: {e} (run `edje-search repair`)") from e

    def read_segment(self, start: int, count: int) -> np.ndarray:
        """All rows of one committed segment (checks, repair)."""
        if self.remote:
            return self.get(np.arange(start, start + count))
        return np.asarray(self._open(start, count))

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """Index into ``segments`` of each row; IndexError for a row no segment holds."""
        pos = np.searchsorted(np.asarray(self._starts), rows, side="right") - 1
        ends = np.asarray([s + n for s, n in self.segments], dtype=np.int64)
        bad = (pos < 0) | (rows >= ends[np.clip(pos, 0, None)])
        if bad.any():
            raise IndexError(f"rows {rows[bad][:5].tolist()} were never committed to {self.url}")
        return pos

    def get(self, rows) -> np.ndarray:
        """Rows in the order asked -> (k, *row_shape)."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            bad = idx[(idx < 0) | (idx >= self.n_rows)][:5].tolist()
            raise IndexError(f"rows out of range [0, {self.n_rows}): {bad}")
        out = np.empty((idx.size, *self.row_shape), dtype=self.dtype)
        if idx.size == 0:
            return out
        seg_of = self.locate(idx)
        if self.remote:
            self._gather_remote(idx, seg_of, out)
            return out
        for si in np.unique(seg_of).tolist():
            start, count = self.segments[si]
            sel = np.nonzero(seg_of == si)[0]
            out[sel] = self._open(start, count)[idx[sel] - start]
        return out

    def _gather_remote(self, idx: np.ndarray, seg_of: np.ndarray, out: np.ndarray) -> None:
        """One ranged GET per row, issued together (fsspec's ``cat_ranges`` runs them concurrently)."""
        paths, starts, ends = [], [], []
        for r, si in zip(idx.tolist(), seg_of.tolist()):
            start, count = self.segments[si]
            offset = self._open(start, count)
            paths.append(self._path(start))
            starts.append(offset + (r - start) * self.row_bytes)
            ends.append(starts[-1] + self.row_bytes)
        blobs = self.fs.cat_ranges(paths, starts, ends)
        flat = out.reshape(idx.size, -1).view(np.uint8)
        for i, b in enumerate(blobs):
            if isinstance(b, Exception) and is_access_failure(b, True):
                raise unavailable(f"row {int(idx[i])} from {paths[i]}", b) from b
            if isinstance(b, Exception) or len(b) != self.row_bytes:
                raise IndexCorrupt(f"short read of row {int(idx[i])} from {paths[i]}")
            flat[i] = np.frombuffer(b, dtype=np.uint8)

    def iter_rows(self, batch: int = 65536, first: int = 0, end: int | None = None):
        """(first row, rows) over the committed rows in [first, end), in order (rebuilds, verification)."""
        end = self.n_rows if end is None else min(end, self.n_rows)
        for start, count in self.segments:
            lo, hi = max(first, start), min(end, start + count)
            if lo >= hi:
                continue
            data = None if self.remote else self._open(start, count)
            for s in range(lo, hi, batch):
                e = min(s + batch, hi)
                yield s, (self.get(np.arange(s, e)) if self.remote else np.asarray(data[s - start:e - start]))


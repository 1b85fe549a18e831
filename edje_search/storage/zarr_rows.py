"""One sharded Zarr v3 array of rows, written and read through tensorstore.

The array has shape (rows, *row_shape). Each row is its own inner chunk (a gather of k rows
reads k small byte ranges; int8's small scale rows take a shard per chunk instead, token_store.py),
protected by a CRC-32C; the inner chunks are grouped into shards
of ``shard_rows`` rows, one storage object each (``c/<shard>/0/0``), whose index (offset and
length of each row) sits at the end of the object under its own CRC-32C. So every damaged byte
is caught on read: a changed row fails its checksum, a truncated shard or an overwritten index
fails the index checksum, and a missing shard or row is an error, never zeros
(``fill_missing_data_reads`` is off).

Append-only without rewriting anything: a commit's first row is always the first row of a
shard (the index store rounds it up, leaving a gap of row numbers that no manifest names), so a
commit only ever creates new shard objects; inner chunks that were never written take no bytes.
``zarr.json`` (the shape any Zarr reader needs) is replaced after the manifest commits; reads
never depend on it: the engine opens the array with the metadata it knows from the index's
config (``assume_metadata``), over a domain of 2**40 rows, and reads only committed rows
(writers look at it only to publish a lagging shape and to check the config before a repair).

Cached shard indexes: a handle does not check a cached shard index against its file before
each read (``recheck_cached_data: "open"``; the check costs a file status per row, a sixth of a
cold gather). A row is read on condition that the shard is still the one the index came from (its
generation: file identity and time, or the ETag on S3), and tensorstore reads the index again when
it is not, so a shard replaced after its index was cached is read right. What that cannot catch
is a shard cached as missing (a deleted one) written since, and rows cached whole (int8's scales,
token_store.py), which are served from memory: a handle opened later checks once every entry
cached before it opened, so the engine reopens after its own repairs, on adopting a new
generation and before verify reads a segment, and a failed read is tried once more through
a freshly opened handle, which replaces the shared one only when that read succeeds.

Why tensorstore rather than zarr-python for reads and writes: a random gather of 100 rows takes
a few milliseconds through tensorstore and over 100 ms through zarr-python's codec pipeline
(docs/storage.md). Both read the same array.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import zlib
from typing import Sequence

import numpy as np

from ..errors import IndexCorrupt, StorageUnavailable
from .checksums import row_checksums
from .segments import is_remote, unavailable
from .zarr_io import (READ_CONTEXT, SHARD_INDEX_POOL, _short, _why, array_metadata, kvstore_spec, metadata_mismatch,
                      open_kvstore, read_document, shared_context)

logger = logging.getLogger(__name__)

_SHARD_KEY = re.compile(r"^c/(\d+)/0/0$")
DOMAIN_ROWS = 2 ** 40  # the engine's view of every array: rows beyond the committed ones are never read
class ZarrRows:
    """Rows of shape ``row_shape`` in one sharded Zarr v3 array at ``url`` (local or remote).

    ``segments`` is the sorted list of (first row, row count) of the commits the manifest names:
    the rows that exist. They need not tile: between commits lie row numbers never written.
    """

    def __init__(self, url: str, row_shape: Sequence[int], dtype: str, shard_rows: int,
                 segments: Sequence[tuple[int, int]] = (), chunk_rows: int = 1, cache_pool: str | None = None):
        self.url = str(url).rstrip("/")
        self.row_shape = tuple(int(x) for x in row_shape)
        self.dtype = np.dtype(dtype)
        self.shard_rows = int(shard_rows)
        if chunk_rows < 1 or self.shard_rows % chunk_rows:
            raise ValueError(f"chunks of {chunk_rows} rows do not divide shards of {self.shard_rows}")
        self.chunk_rows = int(chunk_rows)
        self.cache_pool = cache_pool  # the context's pool that caches read rows (None: not cached)
        self.remote = is_remote(self.url)
        self._lock = threading.Lock()
        self._handle = None
        self._kvstore = None
        # first row -> (checksum, row checksums) of spans written by this process and not yet
        # committed: the commit records them in the manifest with the span (checksums.py)
        self.written: dict[int, tuple[str, bytes]] = {}
        self.set_segments(segments)

    # ------------------------------------------------------------------------------- layout
    def set_segments(self, segments: Sequence[tuple[int, int]]) -> None:
        spans = sorted((int(s), int(n)) for s, n in segments)
        end = 0
        for s, n in spans:
            if s < end:
                raise IndexCorrupt(f"{self.url}: committed spans overlap at row {s}")
            end = s + n
        # a new generation may follow a repair elsewhere: reopen first, so that no read of the new
        # generation's rows goes through a handle that trusts what was cached before it
        self.reopen()
        # one assignment: a gather on another thread sees the old spans or the new, never a mix
        self._bounds = (np.asarray([s for s, _ in spans], dtype=np.int64),
                        np.asarray([s + n for s, n in spans], dtype=np.int64))
        self.segments, self.n_rows = spans, end

    def __len__(self) -> int:
        return self.n_rows

    def shard_key(self, shard: int) -> str:
        return f"c/{shard}/0/0"

    def path_of(self, start: int, rows: Sequence[int] = ()) -> str:
        """Where the span starting at ``start`` lives, or the shards holding ``rows`` (messages)."""
        shards = sorted({int(r) // self.shard_rows for r in rows}) or [start // self.shard_rows]
        return ", ".join(f"{self.url}/{self.shard_key(x)}" for x in shards)

    def _metadata(self, rows: int, attributes: dict | None = None) -> dict:
        return array_metadata(self.row_shape, self.dtype, self.shard_rows, rows, attributes, chunk_rows=self.chunk_rows)

    def _spec(self, rows: int) -> dict:
        return {"driver": "zarr3", "kvstore": kvstore_spec(self.url),
                "metadata": {k: v for k, v in self._metadata(rows).items()
                             if k not in ("zarr_format", "node_type", "attributes")},
                **({"cache_pool": self.cache_pool} if self.cache_pool else {}),
                "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True,
                # shard indexes: their own pool (zarr_io.READ_CONTEXT), not checked against their
                # file before each read (see reopen)
                "metadata_cache_pool": SHARD_INDEX_POOL, "recheck_cached_data": "open"}

    @property
    def handle(self):
        """The tensorstore array, opened with the metadata the index's config gives."""
        handle = self._handle
        if handle is None:
            with self._lock:
                if self._handle is None:
                    self._handle = self._open_handle()
                handle = self._handle
        return handle

    def _open_handle(self):
        import tensorstore as ts

        return ts.open(self._spec(DOMAIN_ROWS), open=True, create=True, assume_metadata=True,
                       context=shared_context()).result()

    def reopen(self) -> None:
        """Open the array afresh on next use, so that shard indexes cached before are checked
        once (see "Cached shard indexes" above)."""
        with self._lock:
            self._handle = None

    # ------------------------------------------------------------------------------ writing
    def write_metadata(self, rows: int, attributes: dict) -> None:
        """Replace ``zarr.json`` (shape ``rows``): one rename on a local disk, one PUT remotely."""
        doc = json.dumps(self._metadata(rows, attributes), indent=1).encode()
        self.kvstore.write("zarr.json", doc).result()

    def read_metadata(self) -> dict | None:
        """This array's ``zarr.json`` (None when it is missing or not JSON)."""
        return read_document(self.kvstore, "zarr.json")

    def write_segment(self, start: int, rows: np.ndarray) -> tuple[int, int]:
        """Write ``rows`` at [start, start + b); returns (start, b). ``start`` must begin a shard
        (a commit never touches a shard an earlier commit wrote). Not visible to readers until
        the manifest commits the returned span."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows have shape {rows.shape[1:]}, the store holds {self.row_shape}")
        if start % self.shard_rows:
            raise ValueError(f"a commit starts at a shard boundary (multiple of {self.shard_rows}), not row {start}")
        if len(rows):
            self.write_rows(start, rows)
        self.written[start] = span_checksum(rows)
        return start, rows.shape[0]

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write rows at any position (what a commit does after its checks; migrate copies 0.2's
        rows to their own row numbers with it)."""
        try:
            self.handle[start:start + len(rows)].write(rows).result()
        except ValueError as e:
            raise OSError(f"writing rows {start}-{start + len(rows) - 1} to {self.url}: {_short(e)}") from e

    def rewrite_rows(self, lost: Sequence[int], starts: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Repair: replace each shard holding a row of ``lost`` by one with those rows zeroed and
        every other committed row as it reads now (rows that cannot be read must be in ``lost``).
        ``starts`` is ignored (a span's damage is always named by its rows). Returns the committed
        spans whose bytes changed, with fresh checksums in ``written``.

        The new shard is encoded in memory by tensorstore and replaces the stored object in one
        key-value write (a rename on a local disk, one PUT on S3): a reader, or a crash, meets the
        damaged shard or the repaired one, never a missing or partial one."""
        lost_set = {int(r) for r in lost}
        touched: set[tuple[int, int]] = set()
        for shard in sorted({r // self.shard_rows for r in lost_set}):
            lo, hi = shard * self.shard_rows, (shard + 1) * self.shard_rows
            spans = [(s, n) for s, n in self.segments if s < hi and s + n > lo]
            parts = {a: self._read_rows_skipping(np.arange(a, b), lost_set)
                     for a, b in ((max(s, lo), min(s + n, hi)) for s, n in spans)}
            self._replace_shard(shard, parts)
            touched.update(spans)
        for s, n in touched:
            self.written[s] = span_checksum(self.read_segment(s, n))
        return sorted(touched)

    def _read_rows_skipping(self, rows: np.ndarray, lost: set[int]) -> np.ndarray:
        out = np.zeros((len(rows), *self.row_shape), dtype=self.dtype)
        ok = np.array([int(r) not in lost for r in rows], dtype=bool)
        if ok.any():
            out[ok] = self.get(rows[ok])
        return out

    def _replace_shard(self, shard: int, parts: dict[int, np.ndarray]) -> None:
        import tensorstore as ts

        spec = dict(self._spec(DOMAIN_ROWS), kvstore={"driver": "memory"})
        # a context of its own: the memory store of a shared one would outlive this call
        scratch = ts.open(spec, create=True, context=ts.Context(READ_CONTEXT)).result()
        for first, rows in parts.items():
            scratch[first:first + len(rows)].write(rows).result()
        key = self.shard_key(shard)
        data = scratch.kvstore.read(key).result().value
        self.kvstore.write(key, data).result()
        self.reopen()

    @property
    def kvstore(self):
        """The array's key-value store (tensorstore): whole-object writes, listing, deletes, and
        ``zarr.json``, through the same client and credentials as the rows."""
        if self._kvstore is None:
            self._kvstore = open_kvstore(self.url)
        return self._kvstore

    def stored_shards(self) -> dict[int, str]:
        """Shard number -> key of every object under the array's ``c/`` (any other key there, such
        as a temporary file a killed write left, gets a negative number)."""
        import tensorstore as ts

        found: dict[int, str] = {}
        keys = self.kvstore.list(ts.KvStore.KeyRange("c/", "c0")).result()
        for key in sorted(k.decode() for k in keys):
            m = _SHARD_KEY.match(key)
            found[int(m.group(1)) if m else -1 - len(found)] = key
        return found

    def _owned_shards(self) -> set[int]:
        owned: set[int] = set()
        for s, n in self.segments:
            owned.update(range(s // self.shard_rows, (s + n - 1) // self.shard_rows + 1) if n else ())
        return owned

    def stray_files(self) -> list[str]:
        """Objects under the array that no committed span owns (left by a crashed commit)."""
        owned = self._owned_shards()
        return sorted(name for shard, name in self.stored_shards().items() if shard not in owned)

    def remove_stray_files(self) -> list[str]:
        import tensorstore as ts

        stray = self.stray_files()
        for key in stray:
            self.kvstore.delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()
        if stray:
            logger.info("removed %d uncommitted shard files from %s", len(stray), self.url)
        return stray

    def layout_mismatch(self, segments: Sequence[tuple[int, int]]) -> str | None:
        """How the stored array disagrees with the layout this store was opened with (the index
        config), or None: its ``zarr.json`` says so, or, without one, the first committed row
        does not read with the config's layout."""
        meta = self.read_metadata()
        if meta is not None:
            return metadata_mismatch(meta, self.row_shape, self.dtype, self.shard_rows, self.chunk_rows)
        # without it, the layout is wrong when no commit's first row reads (damage to every commit
        # at once is far less likely than a changed index.json)
        if segments and all(self.read_checked(start, 1)[1] for start, _ in segments):
            return "its zarr.json is missing and no commit's first row reads with the config's layout"
        return None

    # ------------------------------------------------------------------------------ reading
    def check_rows(self, rows) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not idx.size:
            return idx
        starts, ends = self._bounds
        pos = np.searchsorted(starts, idx, side="right") - 1
        ok = pos >= 0
        ok[ok] &= idx[ok] < ends[pos[ok]]
        if not ok.all():
            raise IndexError(f"rows {idx[~ok][:5].tolist()} were never committed to {self.url}")
        return idx

    def get(self, rows) -> np.ndarray:
        """Committed rows in the order asked -> (k, *row_shape); IndexCorrupt if any is unreadable."""
        return self.read_started(self.start_read(rows))

    def start_read(self, rows):
        """Begin reading committed rows (checked now); :meth:`read_started` waits for them. Two
        arrays read together (int8 tokens and their scales) overlap their I/O this way."""
        idx = self.check_rows(rows)
        handle = self.handle
        return idx, handle, (handle[idx].read() if idx.size else None)

    def read_started(self, pending) -> np.ndarray:
        idx, handle, future = pending
        if future is None:
            return np.zeros((0, *self.row_shape), dtype=self.dtype)
        try:
            return future.result()
        except ValueError as e:
            if _why(e) is None:  # a failure of access, not of the stored bytes: nothing to refresh
                raise read_failure(self, e) from e
        # The shard may have been replaced since its index was cached: read once more through a
        # handle that checks what was cached. Only when that read succeeds does it replace the
        # shared handle, so rows that stay damaged do not make every reader recheck its cache.
        try:
            fresh = self._open_handle()
            out = fresh[idx].read().result()
        except ValueError as e:
            raise read_failure(self, e) from e
        with self._lock:
            if self._handle is handle:  # not already replaced by a newer reopen
                self._handle = fresh
        return out

    def read_segment(self, start: int, count: int) -> np.ndarray:
        return self.get(np.arange(start, start + count))

    def iter_rows(self, batch: int = 65536, first: int = 0, end: int | None = None):
        """(first row, rows) over the committed rows in [first, end), in order."""
        end = self.n_rows if end is None else min(end, self.n_rows)
        for start, count in self.segments:
            lo, hi = max(first, start), min(end, start + count)
            for s in range(lo, hi, batch):
                yield s, self.get(np.arange(s, min(s + batch, hi)))

    def read_checked(self, start: int, count: int) -> tuple[np.ndarray | None, list[int], str]:
        """(the span's rows with zeros in place of unreadable ones, the unreadable rows, the first
        reason); rows None when none can be read. A whole span is read once when all of it reads."""
        try:
            return self.read_segment(start, count), [], ""
        except StorageUnavailable:
            raise  # not damage: verify and repair stop here instead of dropping rows
        except IndexCorrupt:
            pass
        lost, why = lost_rows(self, start, count)
        if len(lost) == count:
            return None, lost, why
        return self._read_rows_skipping(np.arange(start, start + count), set(lost)), lost, why

    def span_matches(self, start: int, rows: np.ndarray, checksum: str) -> bool:
        """Whether the span's rows still have the checksum their commit recorded."""
        return span_checksum(rows)[0] == checksum


def span_checksum(rows: np.ndarray) -> tuple[str, bytes]:
    """(CRC-32 of the span's row bytes, CRC-32 of each row): what the manifest records."""
    data = np.ascontiguousarray(rows)
    return f"crc32:{zlib.crc32(data.reshape(-1).view(np.uint8)):08x}", row_checksums(data)


def read_failure(rows: ZarrRows, e: Exception) -> IndexCorrupt:
    """The error a failed read of committed rows raises: IndexGone when the whole index folder
    went away under the reader, StorageUnavailable when the storage refused or failed the read
    (nothing is known to be damaged), IndexCorrupt when the stored bytes are damaged."""
    from pathlib import Path

    from ..errors import IndexGone
    from .layout import CONFIG_FILE

    index_dir = Path(rows.url).parent.parent
    if not rows.remote and not (index_dir / CONFIG_FILE).exists():
        return IndexGone(f"index {index_dir} was removed (restore it or build it again)")
    if _why(e) is None:
        return unavailable(f"stored rows under {rows.url}", _short(e))
    return IndexCorrupt(f"stored rows unreadable under {rows.url}: {_short(e)} (run `edje-search verify`, "
                        f"then `repair`)")


def lost_rows(arr: ZarrRows, start: int, count: int) -> tuple[list[int], str]:
    """Rows of the span that cannot be read (missing or damaged shard, a row failing its
    CRC-32C) and the first reason. A failure of access raises StorageUnavailable instead: it is
    no reason to drop rows."""
    lost: list[int] = []
    reason = ""
    for lo in range(start - start % arr.shard_rows, start + count, arr.shard_rows):
        part = np.arange(max(lo, start), min(lo + arr.shard_rows, start + count))
        try:
            arr.handle[part].read().result()
            continue
        except ValueError as e:
            reason = reason or damage_reason(arr, e)
        for r in part.tolist():  # which rows of this shard: all when its index is lost
            try:
                arr.handle[r].read().result()
            except ValueError as e:
                damage_reason(arr, e)
                lost.append(r)
    return lost, reason


def damage_reason(arr: ZarrRows, e: Exception) -> str:
    """What a failed read says of the stored bytes; StorageUnavailable when it says nothing
    (the storage refused or failed the read)."""
    why = _why(e)
    if why is None:
        raise read_failure(arr, e) from e
    return why

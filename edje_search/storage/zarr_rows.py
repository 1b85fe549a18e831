"""One sharded Zarr v3 array of rows, written and read through tensorstore.

The array has shape (rows, *row_shape). Each row is its own inner chunk (a gather of k rows
reads k small byte ranges), protected by a CRC-32C; the inner chunks are grouped into shards
of ``shard_rows`` rows, one storage object each (``c/<shard>/0/0``), whose index (offset and
length of each row) sits at the end of the object under its own CRC-32C. So every damaged byte
is caught on read: a changed row fails its checksum, a truncated shard or an overwritten index
fails the index checksum, and a missing shard or row is an error, never zeros
(``fill_missing_data_reads`` is off).

Append-only without rewriting anything: a commit's first row is always the first row of a
shard (the index store rounds it up, leaving a gap of row numbers that no manifest names), so a
commit only ever creates new shard objects; inner chunks that were never written take no bytes.
``zarr.json`` (the shape any Zarr reader needs) is replaced after the manifest commits; the
engine itself never reads it: it opens the array with the metadata it knows from the index's
config (``assume_metadata``), over a domain of 2**40 rows, and reads only committed rows.

Why tensorstore rather than zarr-python for reads and writes: a random gather of 100 rows takes
a few milliseconds through tensorstore and over 100 ms through zarr-python's codec pipeline
(docs/storage.md). Both read the same array.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import zlib
from typing import Sequence

import numpy as np

from ..errors import IndexCorrupt
from ..fsutil import atomic_write_bytes
from .checksums import row_checksums

logger = logging.getLogger(__name__)

DOMAIN_ROWS = 2 ** 40  # the engine's view of every array: rows beyond the committed ones are never read
# Reads shared by every array of a process: up to 32 file reads in flight (a gather is k small
# independent reads; measured on a cold disk, 32 in flight took 100 reads from 24 ms one at a time
# to 5 ms), and 64 MiB of cache, enough for the shard indexes of 16M rows (4 KiB per 256 rows),
# so a gather mostly pays one read per row. Cached entries are revalidated on each read (the
# default), so a shard that repair rewrote is never read through a stale index.
READ_CONTEXT = {"cache_pool": {"total_bytes_limit": 64 << 20}, "file_io_concurrency": {"limit": 32}}
_context = None
_context_lock = threading.Lock()


def shared_context():
    """The one tensorstore context of this process (created on first use)."""
    global _context
    with _context_lock:
        if _context is None:
            import tensorstore as ts

            _context = ts.Context(READ_CONTEXT)
        return _context
_SHARD_KEY = re.compile(r"^c/(\d+)/0/0$")


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def _local_path(url: str) -> str:
    return str(url)[len("file://"):] if str(url).startswith("file://") else str(url)


def kvstore_spec(url: str) -> dict:
    """The tensorstore key-value store of a local folder, ``s3://bucket/prefix`` or ``gs://...``.

    S3 credentials come from the AWS chain tensorstore reads (``AWS_ACCESS_KEY_ID``/
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles); the endpoint of an
    S3-compatible server from ``AWS_ENDPOINT_URL`` or fsspec's ``s3`` config (``endpoint_url``),
    the same place the vectors' fsspec store takes it from.
    """
    url = str(url).rstrip("/")
    if not is_remote(url):
        return {"driver": "file", "path": _local_path(url) + "/"}
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    path = f"{prefix}/" if prefix else ""
    if scheme == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": path}
    if scheme != "s3":
        raise IndexCorrupt(f"token store URL {url!r}: only local folders, s3:// and gs:// are supported")
    import fsspec

    conf = fsspec.config.conf.get("s3", {})
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or conf.get("endpoint_url") or conf.get("client_kwargs", {}).get("endpoint_url"))
    region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or conf.get("client_kwargs", {}).get("region_name") or "us-east-1")
    spec = {"driver": "s3", "bucket": bucket, "path": path, "aws_region": region}
    if endpoint:
        spec["endpoint"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def array_metadata(row_shape: Sequence[int], dtype: str, shard_rows: int, rows: int,
                   attributes: dict | None = None, compressor: dict | None = None) -> dict:
    """Zarr v3 array metadata: rows of ``row_shape``, one row per CRC-32C-checked inner chunk,
    ``shard_rows`` rows per shard. No compression: measured on trained tokens, no codec pays
    (docs/storage.md); ``compressor`` (a Zarr v3 codec such as zstd or blosc) is there for that
    measurement (benchmarks/token_codecs.py)."""
    row_shape = [int(x) for x in row_shape]
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    one_byte = np.dtype(dtype).itemsize == 1
    return {
        "zarr_format": 3, "node_type": "array",
        "shape": [int(rows), *row_shape], "data_type": str(np.dtype(dtype)),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(shard_rows), *row_shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *row_shape],
            "codecs": [{"name": "bytes"} if one_byte else little, *([compressor] if compressor else []),
                       {"name": "crc32c"}],
            "index_codecs": [little, {"name": "crc32c"}],
            "index_location": "end"}}],
        "fill_value": 0,
        "attributes": attributes or {},
    }


def _short(e: Exception) -> str:
    """tensorstore's error, without its source location trailer."""
    return str(e).split(" [source locations=")[0].split(" [tensorstore_spec=")[0]


def _why(e: Exception) -> str:
    """What a failed read of stored rows means, in a few words."""
    text = _short(e)
    if "is missing" in text or "NOT_FOUND" in text:
        return "shard file missing"
    if "shard index" in text:
        return "shard truncated or its index damaged"
    if "Digest mismatch" in text:
        return "rows fail their CRC-32C"
    return text[:160]


class ZarrRows:
    """Rows of shape ``row_shape`` in one sharded Zarr v3 array at ``url`` (local or remote).

    ``segments`` is the sorted list of (first row, row count) of the commits the manifest names:
    the rows that exist. They need not tile: between commits lie row numbers never written.
    """

    def __init__(self, url: str, row_shape: Sequence[int], dtype: str, shard_rows: int,
                 segments: Sequence[tuple[int, int]] = ()):
        self.url = str(url).rstrip("/")
        self.row_shape = tuple(int(x) for x in row_shape)
        self.dtype = np.dtype(dtype)
        self.shard_rows = int(shard_rows)
        self.remote = is_remote(self.url)
        self._lock = threading.Lock()
        self._handle = None
        self._fs = None
        # first row -> (checksum, row checksums) of spans written by this process and not yet
        # committed: the commit records them in the manifest with the span (checksums.py)
        self.written: dict[int, tuple[str, bytes]] = {}
        self.set_segments(segments)

    # ------------------------------------------------------------------------------- layout
    def set_segments(self, segments: Sequence[tuple[int, int]]) -> None:
        self.segments = sorted((int(s), int(n)) for s, n in segments)
        self._starts = np.asarray([s for s, _ in self.segments], dtype=np.int64)
        end = 0
        for s, n in self.segments:
            if s < end:
                raise IndexCorrupt(f"{self.url}: committed spans overlap at row {s}")
            end = s + n
        self.n_rows = end

    def __len__(self) -> int:
        return self.n_rows

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            self._fs, self._fs_root = fsspec.core.url_to_fs(self.url)
        return self._fs

    def shard_key(self, shard: int) -> str:
        return f"c/{shard}/0/0"

    def path_of(self, start: int) -> str:
        """Where the span starting at ``start`` lives (messages)."""
        return f"{self.url}/{self.shard_key(start // self.shard_rows)}"

    def _spec(self, rows: int) -> dict:
        return {"driver": "zarr3", "kvstore": kvstore_spec(self.url),
                "metadata": {k: v for k, v in array_metadata(self.row_shape, self.dtype, self.shard_rows, rows).items()
                             if k not in ("zarr_format", "node_type", "attributes")},
                "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}

    @property
    def handle(self):
        """The tensorstore array, opened once with the metadata the index's config gives."""
        if self._handle is None:
            import tensorstore as ts

            with self._lock:
                if self._handle is None:
                    self._handle = ts.open(self._spec(DOMAIN_ROWS), open=True, create=True, assume_metadata=True,
                                           context=shared_context()).result()
        return self._handle

    # ------------------------------------------------------------------------------ writing
    def write_metadata(self, rows: int, attributes: dict) -> None:
        """Replace ``zarr.json`` (shape ``rows``): one rename on a local disk, one PUT remotely."""
        doc = json.dumps(array_metadata(self.row_shape, self.dtype, self.shard_rows, rows, attributes),
                         indent=1).encode()
        write_document(self.url, "zarr.json", doc, self.fs if self.remote else None)

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
            self._write(start, rows)
        self.written[start] = span_checksum(rows)
        return start, rows.shape[0]

    def _write(self, start: int, rows: np.ndarray) -> None:
        try:
            self.handle[start:start + len(rows)].write(rows).result()
        except ValueError as e:
            raise OSError(f"writing rows {start}-{start + len(rows) - 1} to {self.url}: {_short(e)}") from e

    def rewrite_rows(self, lost: Sequence[int], starts: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Repair: rewrite each shard holding a row of ``lost`` with those rows zeroed and every
        other committed row as it reads now (rows that cannot be read must be in ``lost``).
        Returns the committed spans whose bytes changed, with fresh checksums in ``written``.

        A shard is deleted and written anew (a damaged shard cannot be updated in place: its
        index is what is damaged); a crash in between loses that shard's rows, which the next
        ``verify`` names and the next ``repair`` drops."""
        lost_set = {int(r) for r in lost}
        shards = sorted({r // self.shard_rows for r in lost_set} | {int(s) // self.shard_rows for s in starts})
        touched: set[tuple[int, int]] = set()
        for shard in shards:
            lo, hi = shard * self.shard_rows, (shard + 1) * self.shard_rows
            spans = [(s, n) for s, n in self.segments if s < hi and s + n > lo]
            keep = [(max(s, lo), min(s + n, hi)) for s, n in spans]
            data = {a: self._read_rows_skipping(np.arange(a, b), lost_set) for a, b in keep}
            self.delete_shards([shard])
            for a, rows in data.items():
                self._write(a, rows)
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

    def delete_shards(self, shards: Sequence[int]) -> None:
        for shard in shards:
            key = f"{self.url}/{self.shard_key(int(shard))}"
            try:
                self.fs.rm(key) if self.remote else os.unlink(key)
            except FileNotFoundError:
                pass

    def stored_shards(self) -> dict[int, str]:
        """Shard number -> object name of every object under the array's ``c/`` (and any other
        file there, keyed -1: temporary files a killed write left)."""
        found: dict[int, str] = {}
        base = f"{self.url}/c"
        try:
            if self.remote:
                found_paths = self.fs.find(base)
                names = [p[len(self._fs_root.rstrip("/")) + 1:] for p in found_paths]
            else:
                names = [os.path.relpath(os.path.join(d, f), self.url).replace(os.sep, "/")
                         for d, _, files in os.walk(base) for f in files]
        except FileNotFoundError:
            return found
        for name in names:
            m = _SHARD_KEY.match(name)
            found[int(m.group(1)) if m else -1 - len(found)] = name
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
        stray = self.stray_files()
        for name in stray:
            path = f"{self.url}/{name}"
            try:
                self.fs.rm(path) if self.remote else os.unlink(path)
            except FileNotFoundError:
                pass
        if stray:
            logger.info("removed %d uncommitted shard files from %s", len(stray), self.url)
        return stray

    def config_mismatch(self) -> str | None:
        """How ``zarr.json`` disagrees with the row shape, dtype and shard size this store was
        opened with (the index config), or None (also when there is no readable zarr.json)."""
        try:
            raw = self.fs.cat_file(f"{self.url}/zarr.json") if self.remote else \
                open(f"{_local_path(self.url)}/zarr.json", "rb").read()
            meta = json.loads(raw)
            stored = (tuple(meta["shape"][1:]), np.dtype(meta["data_type"]),
                      int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        want = (self.row_shape, self.dtype, self.shard_rows)
        if stored != want:
            return (f"zarr.json holds rows of shape {stored[0]} {stored[1]} in shards of {stored[2]}, the "
                    f"config says {want[0]} {want[1]} in shards of {want[2]}")
        return None

    # ------------------------------------------------------------------------------ reading
    def check_rows(self, rows) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not idx.size:
            return idx
        pos = np.searchsorted(self._starts, idx, side="right") - 1
        ok = pos >= 0
        ends = np.asarray([s + n for s, n in self.segments], dtype=np.int64)
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
        return self.handle[idx].read() if idx.size else None

    def read_started(self, pending) -> np.ndarray:
        if pending is None:
            return np.zeros((0, *self.row_shape), dtype=self.dtype)
        try:
            return pending.result()
        except ValueError as e:
            raise self._corrupt(e) from e

    def _corrupt(self, e: Exception) -> IndexCorrupt:
        from pathlib import Path

        from .layout import CONFIG_FILE

        index_dir = Path(self.url).parent.parent
        if not self.remote and not (index_dir / CONFIG_FILE).exists():
            from ..errors import IndexGone

            return IndexGone(f"index {index_dir} was removed (restore it or build it again)")
        return IndexCorrupt(f"stored rows unreadable under {self.url}: {_short(e)} (run `edje-search verify`, "
                            f"then `repair`)")

    def read_segment(self, start: int, count: int) -> np.ndarray:
        return self.get(np.arange(start, start + count))

    def iter_rows(self, batch: int = 65536, first: int = 0, end: int | None = None):
        """(first row, rows) over the committed rows in [first, end), in order."""
        end = self.n_rows if end is None else min(end, self.n_rows)
        for start, count in self.segments:
            lo, hi = max(first, start), min(end, start + count)
            for s in range(lo, hi, batch):
                yield s, self.get(np.arange(s, min(s + batch, hi)))

    def read_span(self, start: int, count: int, lost: Sequence[int] = ()) -> np.ndarray:
        """The span's rows, zeros in place of the rows in ``lost`` (unreadable ones)."""
        return self._read_rows_skipping(np.arange(start, start + count), {int(r) for r in lost})

    def span_matches(self, start: int, rows: np.ndarray, checksum: str) -> bool:
        """Whether the span's rows still have the checksum their commit recorded."""
        return span_checksum(rows)[0] == checksum

    def unreadable_rows(self, start: int, count: int) -> tuple[list[int], str]:
        """Rows of the span [start, start + count) that cannot be read (missing or damaged shard,
        a row failing its CRC-32C), and the first reason; ([], "") when all read."""
        try:
            self.read_segment(start, count)
            return [], ""
        except IndexCorrupt:
            pass
        lost: list[int] = []
        reason = ""
        for lo in range(start - start % self.shard_rows, start + count, self.shard_rows):
            part = np.arange(max(lo, start), min(lo + self.shard_rows, start + count))
            try:
                self.handle[part].read().result()
                continue
            except ValueError as e:
                reason = reason or _why(e)
            for r in part.tolist():  # which rows of this shard: all when its index is lost
                try:
                    self.handle[r].read().result()
                except ValueError:
                    lost.append(r)
        return lost, reason


def span_checksum(rows: np.ndarray) -> tuple[str, bytes]:
    """(CRC-32 of the span's row bytes, CRC-32 of each row): what the manifest records."""
    data = np.ascontiguousarray(rows)
    return f"crc32:{zlib.crc32(data.reshape(-1).view(np.uint8)):08x}", row_checksums(data)


def write_document(url: str, name: str, data: bytes, fs=None) -> None:
    """A small metadata document (zarr.json) replaced whole: rename locally, one PUT remotely."""
    if fs is not None:
        fs.pipe(f"{url.rstrip('/')}/{name}", data)
    else:
        os.makedirs(_local_path(url), exist_ok=True)
        atomic_write_bytes(os.path.join(_local_path(url), name), data)

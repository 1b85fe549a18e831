"""Where tensorstore meets the index's storage: key-value stores for local folders and S3 (or
GCS), the one read context of a process, the Zarr v3 metadata of a row array, and what a failed
read means. Used by the token store (zarr_rows.py, token_store.py) and by index creation, which
checks a store URL before anything is written.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Sequence

import numpy as np

from ..errors import BadInput
from .segments import is_remote

# Reads shared by every array of a process: up to 32 file reads in flight (a gather is k small
# independent reads; on this project's test disk 100 cold reads took 12 ms one at a time and 4.4 ms
# with 32 in flight: benchmarks/disk_floor.py), and cache pools. Shard indexes (4 KiB per 256 rows)
# live in their own 64 MiB pool, which holds those of about 4M rows; token rows are not cached here
# (the page cache keeps hot rows, and a gather's 100 rows would otherwise push the indexes out of a
# shared pool). When a cached index is checked against its shard: zarr_rows.py.
#
# int8 indexes read a scale per token beside each row: their scales are chunked a shard at a time
# (33 KiB) and cached in a pool of their own, 256 MiB, which holds those of about 2M rows, so a
# gather reads each row's tokens and no second byte range (token_store.py).
SHARD_INDEX_POOL = "cache_pool#shard_index"
SCALES_POOL = "cache_pool#scales"
READ_CONTEXT = {"cache_pool": {"total_bytes_limit": 0}, SHARD_INDEX_POOL: {"total_bytes_limit": 64 << 20},
                SCALES_POOL: {"total_bytes_limit": 256 << 20}, "file_io_concurrency": {"limit": 32}}
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
    if scheme in ("gs", "gcs"):
        return {"driver": "gcs", "bucket": bucket, "path": path}
    if scheme != "s3":
        raise BadInput(f"store URL {url!r}: only s3:// and gs:// are supported (or none: inside the index)")
    import fsspec

    conf = fsspec.config.conf.get("s3", {})
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or conf.get("endpoint_url") or conf.get("client_kwargs", {}).get("endpoint_url"))
    region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or conf.get("client_kwargs", {}).get("region_name"))
    spec = {"driver": "s3", "bucket": bucket, "path": path}
    if endpoint:  # an S3-compatible server: it has no bucket-region lookup, so a region is needed
        spec["endpoint"] = endpoint
        region = region or "us-east-1"
    if region:  # otherwise tensorstore asks AWS where the bucket lives
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def array_metadata(row_shape: Sequence[int], dtype: str, shard_rows: int, rows: int,
                   attributes: dict | None = None, compressor: dict | None = None, chunk_rows: int = 1) -> dict:
    """Zarr v3 array metadata: rows of ``row_shape``, ``chunk_rows`` rows per CRC-32C-checked
    inner chunk (one for tokens), ``shard_rows`` rows per shard. No compression: measured on
    trained tokens, no codec pays (docs/storage.md); ``compressor`` (a Zarr v3 codec such as zstd
    or blosc) is there for that measurement (benchmarks/token_codecs.py)."""
    row_shape = [int(x) for x in row_shape]
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    one_byte = np.dtype(dtype).itemsize == 1
    return {
        "zarr_format": 3, "node_type": "array",
        "shape": [int(rows), *row_shape], "data_type": str(np.dtype(dtype)),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(shard_rows), *row_shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [int(chunk_rows), *row_shape],
            "codecs": [{"name": "bytes"} if one_byte else little, *([compressor] if compressor else []),
                       {"name": "crc32c"}],
            "index_codecs": [little, {"name": "crc32c"}],
            "index_location": "end"}}],
        "fill_value": 0,
        "attributes": attributes or {},
    }


def metadata_mismatch(meta: dict | None, row_shape: Sequence[int], dtype, shard_rows: int,
                      chunk_rows: int) -> str | None:
    """How an array's ``zarr.json`` (``meta``) disagrees with the layout the index config gives,
    or None (also when ``meta`` is missing or unreadable)."""
    try:
        codec = meta["codecs"][0]
        inner = codec["configuration"]["chunk_shape"][0] if codec["name"] == "sharding_indexed" else None
        stored = (tuple(meta["shape"][1:]), np.dtype(meta["data_type"]),
                  int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]), inner)
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    want = (tuple(row_shape), np.dtype(dtype), int(shard_rows), int(chunk_rows))
    if stored != want:
        return (f"zarr.json holds rows of shape {stored[0]} {stored[1]} in shards of {stored[2]} (chunks of "
                f"{stored[3]}), the config says {want[0]} {want[1]} in shards of {want[2]} (chunks of {want[3]})")
    return None


def _short(e: Exception) -> str:
    """tensorstore's error, without its source location trailer."""
    return str(e).split(" [source locations=")[0].split(" [tensorstore_spec=")[0]


# tensorstore status codes that say the stored bytes are missing, cut short or do not decode; any
# other failure (PERMISSION_DENIED, UNAVAILABLE, DEADLINE_EXCEEDED, ...) is about access, not data
_DAMAGE = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "INVALID_ARGUMENT")


def _why(e: Exception) -> str | None:
    """What a failed read of stored rows means, in a few words; None when the failure is not
    damage to the stored bytes: such a failure must stop verify or repair, never drop rows."""
    text = _short(e)
    if not text.startswith(_DAMAGE) or "HTTP response code" in text:  # an answer of the server, not bytes
        return None
    if text.startswith("NOT_FOUND") or "is missing" in text:
        return "shard file missing"
    if "shard index" in text:
        return "shard truncated or its index damaged"
    return "rows fail their CRC-32C" if "Digest mismatch" in text else "stored bytes do not decode"


def open_kvstore(url: str):
    import tensorstore as ts

    return ts.KvStore.open(kvstore_spec(url), context=shared_context()).result()


def read_document(kvstore, name: str) -> dict | None:
    """A small JSON document of a key-value store (None when it is missing or not JSON)."""
    try:
        found = kvstore.read(name).result()
        return json.loads(found.value) if found.state == "value" else None
    except ValueError:
        return None

"""Ways to damage a stored index on purpose, for the integrity tests.

Token rows live in Zarr v3 shards (``tokens.zarr/<array>/c/<shard>/0/0``): the row bytes, each
followed by its CRC-32C, then the shard index (offset and length of each row, little-endian
uint64 pairs) and the index's CRC-32C at the end of the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def shard_file(index_dir: Path, row: int, shard_rows: int = 256, array: str = "tokens") -> Path:
    return Path(index_dir) / "tokens.zarr" / array / "c" / str(row // shard_rows) / "0" / "0"


def row_span(index_dir: Path, row: int, shard_rows: int = 256, array: str = "tokens") -> tuple[Path, int, int]:
    """(shard file, byte offset, length) of one stored row's bytes. A row shares its inner chunk,
    and the chunk's CRC-32C, with the other rows of the chunk when chunks hold several rows (the
    array's zarr.json says how many)."""
    path = shard_file(index_dir, row, shard_rows, array)
    meta = json.loads((Path(index_dir) / "tokens.zarr" / array / "zarr.json").read_text())
    chunk_rows = meta["codecs"][0]["configuration"]["chunk_shape"][0]
    entries = shard_rows // chunk_rows
    tail = path.read_bytes()[-(16 * entries + 4):-4]
    offset, nbytes = np.frombuffer(tail, dtype="<u8").reshape(entries, 2)[(row % shard_rows) // chunk_rows]
    row_bytes = (int(nbytes) - 4) // chunk_rows
    return path, int(offset) + (row % chunk_rows) * row_bytes, row_bytes


def flip_row_bytes(index_dir: Path, rows, shard_rows: int = 256, array: str = "tokens", at: int = 5) -> None:
    """XOR one data byte of each row in ``rows`` (as bit rot would)."""
    for row in rows:
        path, offset, _ = row_span(index_dir, row, shard_rows, array)
        data = bytearray(path.read_bytes())
        data[offset + at] ^= 0x10
        path.write_bytes(bytes(data))


def write_rows_behind_the_index(store, rows, values, array: str = "tokens") -> None:
    """Overwrite stored rows through Zarr itself (valid shards, fresh CRC-32Cs): damage only
    the checksums the manifest recorded can see, as a stray tool writing the array would."""
    arr = store.tokens.arrays[array]
    arr.handle[np.asarray(rows)].write(np.asarray(values, dtype=arr.dtype)).result()


def shifted_shard(data: bytes, shard_rows: int = 256, pad: int = 4096) -> bytes:
    """The same rows as a valid shard of another layout: ``pad`` bytes first, every offset moved."""
    from numcodecs import CRC32C

    tail = shard_rows * 16 + 4
    index = np.frombuffer(data[-tail:-4], dtype="<u8").reshape(shard_rows, 2).copy()
    index[index[:, 0] != np.iinfo(np.uint64).max, 0] += pad
    return bytes(pad) + data[:-tail] + np.asarray(CRC32C().encode(index.tobytes())).tobytes()

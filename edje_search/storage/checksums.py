"""Checksums of the stored vector and token segments, and the checks that use them.

Each commit's vector file and token span get two records in the manifest: a CRC-32 of the
whole (the vector file with its header; the token span's row bytes) and a CRC-32 per row (4
bytes a row, little-endian uint32). The whole checksum says cheaply whether anything changed;
the row checksums say which rows did, so ``repair`` drops exactly the damaged rows and keeps
the rest. (The token shards also carry Zarr's own CRC-32C per row and per shard index, which
tensorstore checks on every read: zarr_rows.py.) CRC-32 (zlib) is
enough here: the threat is damage (flipped bits, torn writes, a stray tool), not an adversary
who forges a matching checksum, and zlib's CRC runs at memory speed.

Segments committed before checksums existed have no record: they are "unchecked", reported as
such by ``verify`` and read as before. Every segment, checked or not, is also scanned for
non-finite values (NaN, inf), which a commit refuses to store.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .rows import RowArray

ALGORITHM = "crc32"


def file_checksum(data: bytes | memoryview) -> str:
    return f"{ALGORITHM}:{zlib.crc32(data):08x}"


def row_checksums(rows: np.ndarray) -> bytes:
    """CRC-32 of each row's bytes, as little-endian uint32s."""
    flat = np.ascontiguousarray(rows).reshape(rows.shape[0], -1).view(np.uint8)
    return np.fromiter((zlib.crc32(r) for r in flat), dtype="<u4", count=flat.shape[0]).tobytes()


_HALF_EXPONENT = np.uint16(0x7C00)  # a float16 whose exponent bits are all ones is an inf or a NaN


def _finite_mask(flat: np.ndarray) -> np.ndarray:
    """Per row of a 2-d float array: True where every value is finite. numpy's isfinite has no
    vectorised float16 loop (about 15x slower than this test of the exponent bits)."""
    if flat.dtype == np.float16:
        return (np.ascontiguousarray(flat).view(np.uint16) & _HALF_EXPONENT).max(axis=1) < _HALF_EXPONENT
    return np.isfinite(flat).all(axis=1)


def all_finite(values: np.ndarray) -> bool:
    if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
        return True
    return bool(_finite_mask(values.reshape(1, -1))[0])


def non_finite_rows(rows: np.ndarray) -> np.ndarray:
    """Offsets (into ``rows``) of the rows holding a NaN or an infinity; none for integer data."""
    if not np.issubdtype(rows.dtype, np.floating) or rows.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(~_finite_mask(rows.reshape(rows.shape[0], -1)))[0]


def written_checksums(arrays: dict, segs) -> list[tuple[str, int, str, bytes]]:
    """(store, first row, file checksum, row checksums) of the segments ``segs`` (store, first
    row, count) that this process just wrote, for the manifest commit that names them."""
    return [(kind, s, *arrays[kind].written.pop(s)) for kind, s, _n in segs]


@dataclasses.dataclass
class SegmentDamage:
    """What is wrong with one segment: the rows lost (absolute row numbers) and why."""

    kind: str
    path: str
    start: int
    count: int
    rows: list[int]
    reason: str
    readable: bool = True  # False when the file itself cannot be read (missing, wrong length)

    def message(self) -> str:
        span = f"rows {self.start}-{self.start + self.count - 1}"
        if not self.rows:
            return f"{self.kind} segment {self.path} ({span}): {self.reason}"
        first = ", ".join(str(r) for r in self.rows[:8]) + (", ..." if len(self.rows) > 8 else "")
        return f"{self.kind} segment {self.path} ({span}): {self.reason}: {len(self.rows)} rows damaged ({first})"


def check_segment(kind: str, arr: RowArray, start: int, count: int,
                  record: tuple[str, bytes] | None) -> SegmentDamage | None:
    """Damage in one committed segment (a vector ``.npy`` file or a span of token rows), or None
    when it is whole.

    ``record`` is the (checksum, row checksums) committed with the segment, None for one written
    before checksums. Rows that cannot be read are lost; when the whole-segment checksum fails,
    the rows whose own checksums fail are lost too (none, if only a file header changed: the
    segment is then rewritten by repair with its rows intact).
    """
    rows, lost, why = arr.read_checked(start, count)
    if rows is None:
        return SegmentDamage(kind, arr.path_of(start, lost), start, count, lost, why, readable=False)
    bad: set[int] = set(lost)
    reasons = [why] if lost else []
    if record is not None and not arr.span_matches(start, rows, record[0]):
        want = np.frombuffer(record[1], dtype="<u4")
        got = np.frombuffer(row_checksums(rows), dtype="<u4")
        changed = np.nonzero(want != got)[0] if want.shape == got.shape else np.arange(count)
        changed = [r for r in (changed + start).tolist() if r not in bad]
        if changed or not lost:
            reasons.append("fails its checksum" + ("" if changed else " (header bytes changed, rows intact)"))
        bad.update(changed)
    nan = non_finite_rows(rows)
    if nan.size:
        bad.update((nan + start).tolist())
        reasons.append("holds NaN or infinite values")
    if not reasons:
        return None
    return SegmentDamage(kind, arr.path_of(start, sorted(bad)), start, count, sorted(bad), " and ".join(reasons))

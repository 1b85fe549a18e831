"""Stores of per-image tokens (N, m, d): what the reranker reads at query time.

The reranker only sees the :class:`TokenStore` protocol; Zarr stays inside this module.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import IndexCorrupt


@runtime_checkable
class TokenStore(Protocol):
    """Row-addressed array of image tokens."""

    tokens_per_image: int
    width: int

    def __len__(self) -> int: ...

    def get(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows in the order asked -> (k, m, d) array."""
        ...

    def write(self, start: int, tokens: np.ndarray) -> None:
        """Write (b, m, d) tokens at rows [start, start + b), growing the store if needed."""
        ...

    def truncate(self, n_rows: int) -> None:
        """Drop every row at or beyond ``n_rows``."""
        ...


TOKEN_DTYPES = ("float16", "float32", "int8")


def bytes_per_image(tokens_per_image: int, width: int, dtype: str) -> int:
    """Stored bytes of one image's tokens (int8 adds one float16 scale per token)."""
    if dtype == "int8":
        return tokens_per_image * (width + 2)
    return tokens_per_image * width * np.dtype(dtype).itemsize


def working_dtype(dtype: str) -> str:
    """The float dtype tokens travel in before a store of ``dtype`` takes them."""
    return "float16" if dtype == "int8" else dtype


def quantize_per_token(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per token: (..., d) floats -> int8 (..., d), float16 scales (..., 1)."""
    x = np.asarray(tokens, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / 127.0).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)


def _check_rows(rows, n: int) -> np.ndarray:
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"token rows out of range [0, {n}): {idx[(idx < 0) | (idx >= n)][:5].tolist()}")
    return idx


def _is_raw_layout(path: Path) -> bool:
    """True when chunks are stored as plain little-endian bytes under c/<i>/0/0."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    plain = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if meta.get("data_type") in ("int8", "uint8", "bool"):  # one byte per value: no endianness recorded
        plain = [{"name": "bytes"}] if meta.get("codecs") == [{"name": "bytes"}] else plain
    return (meta.get("codecs") == plain
            and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
            and sys.byteorder == "little" and meta.get("shape", [0, 0, 0])[1:] == meta["chunk_grid"]
            ["configuration"]["chunk_shape"][1:])


class MemoryTokenStore:
    """In-memory store (tests, small collections)."""

    def __init__(self, tokens_per_image: int, width: int, dtype: str = "float16"):
        self.tokens_per_image = tokens_per_image
        self.width = width
        self._data = np.zeros((0, tokens_per_image, width), dtype=dtype)

    def __len__(self) -> int:
        return self._data.shape[0]

    def get(self, rows) -> np.ndarray:
        return self._data[_check_rows(rows, len(self))]

    def write(self, start: int, tokens: np.ndarray) -> None:
        end = start + tokens.shape[0]
        if end > len(self):
            grown = np.zeros((end, self.tokens_per_image, self.width), dtype=self._data.dtype)
            grown[: len(self)] = self._data
            self._data = grown
        self._data[start:end] = tokens

    def truncate(self, n_rows: int) -> None:
        self._data = self._data[:n_rows].copy()


class ZarrTokenStore:
    """A chunked Zarr 3 array on local disk, chunked along rows for cheap random gathers.

    Vision tokens barely compress (Blosc-zstd leaves them at about 0.92x of their size), so chunks are
    stored raw; small row chunks keep a gather of k rows close to k small reads.
    """

    def __init__(self, array, path: Path | None = None):
        self._z = array
        self.tokens_per_image = int(array.shape[1])
        self.width = int(array.shape[2])
        self._path = path
        self._raw_layout = path is not None and _is_raw_layout(path)

    @classmethod
    def create(cls, path: str | Path, tokens_per_image: int, width: int, *, dtype: str = "float16",
               chunk_rows: int = 16) -> "ZarrTokenStore":
        import zarr

        array = zarr.create_array(
            store=zarr.storage.LocalStore(str(path)),
            shape=(0, tokens_per_image, width),
            chunks=(chunk_rows, tokens_per_image, width),
            dtype=dtype,
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
        return cls(array, Path(path))

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r") -> "ZarrTokenStore":
        import zarr

        if not Path(path).is_dir():
            raise FileNotFoundError(f"token store missing: {path}")
        array = zarr.open_array(store=zarr.storage.LocalStore(str(path), read_only=mode == "r"), mode=mode)
        return cls(array, Path(path))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(str(self._z.dtype))

    def __len__(self) -> int:
        return int(self._z.shape[0])

    def get(self, rows) -> np.ndarray:
        idx = _check_rows(rows, len(self))
        if idx.size == 0:
            return np.zeros((0, self.tokens_per_image, self.width), dtype=self.dtype)
        if self._raw_layout:
            try:
                return self._gather_raw(idx)
            except FileNotFoundError:
                pass  # a chunk never written (all fill value): let zarr handle it
        # orthogonal indexing wants sorted unique rows; gather once and restore the asked order
        uniq, inverse = np.unique(idx, return_inverse=True)
        return np.asarray(self._z.oindex[uniq])[inverse]

    def _gather_raw(self, idx: np.ndarray) -> np.ndarray:
        """Read rows straight from the uncompressed chunk files (one pread per row).

        Zarr's per-chunk pipeline costs far more than the bytes for a random gather; with
        the plain ``bytes`` codec a chunk file is the C-order array itself, so a row is a
        fixed-size slice of its chunk file.
        """
        chunk = int(self._z.chunks[0])
        row_bytes = self.tokens_per_image * self.width * self.dtype.itemsize
        out = np.empty((idx.size, self.tokens_per_image, self.width), dtype=self.dtype)
        flat = out.reshape(idx.size, -1).view(np.uint8)
        for i, r in enumerate(idx.tolist()):
            fd = os.open(self._path / "c" / str(r // chunk) / "0" / "0", os.O_RDONLY)
            try:
                n = os.preadv(fd, [flat[i]], (r % chunk) * row_bytes)
            finally:
                os.close(fd)
            if n != row_bytes:
                raise OSError(f"short read of token row {r}")
        return out

    def write(self, start: int, tokens: np.ndarray) -> None:
        end = start + tokens.shape[0]
        if end > len(self):
            self._z.resize((end, self.tokens_per_image, self.width))
        self._z[start:end] = tokens.astype(self.dtype, copy=False)

    def truncate(self, n_rows: int) -> None:
        if n_rows < len(self):
            self._z.resize((n_rows, self.tokens_per_image, self.width))


class Int8ZarrTokenStore:
    """Tokens as int8 with a float16 scale per token: 64 x 384 tokens take 24,704 bytes, not 49,152.

    On disk a Zarr group with two row-chunked raw arrays, ``q`` (N, m, d) int8 and ``scale``
    (N, m, 1) float16; ``get`` returns dequantized float32 tokens.
    """

    def __init__(self, q: ZarrTokenStore, scale: ZarrTokenStore):
        self._q, self._scale = q, scale
        self.tokens_per_image, self.width = q.tokens_per_image, q.width

    @classmethod
    def create(cls, path: str | Path, tokens_per_image: int, width: int, *,
               chunk_rows: int = 16) -> "Int8ZarrTokenStore":
        import zarr

        zarr.create_group(store=zarr.storage.LocalStore(str(path)), overwrite=True,
                          attributes={"edje_tokens": "int8 per-token scale"})
        return cls(ZarrTokenStore.create(Path(path) / "q", tokens_per_image, width, dtype="int8",
                                         chunk_rows=chunk_rows),
                   ZarrTokenStore.create(Path(path) / "scale", tokens_per_image, 1, dtype="float16",
                                         chunk_rows=chunk_rows))

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r") -> "Int8ZarrTokenStore":
        return cls(ZarrTokenStore.open(Path(path) / "q", mode=mode),
                   ZarrTokenStore.open(Path(path) / "scale", mode=mode))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("int8")

    def __len__(self) -> int:
        return min(len(self._q), len(self._scale))

    def get(self, rows) -> np.ndarray:
        idx = _check_rows(rows, len(self))
        return dequantize(self._q.get(idx), self._scale.get(idx))

    def write(self, start: int, tokens: np.ndarray) -> None:
        q, scale = quantize_per_token(tokens)
        self._q.write(start, q)
        self._scale.write(start, scale)

    def truncate(self, n_rows: int) -> None:
        self._q.truncate(n_rows)
        self._scale.truncate(n_rows)


def create_token_store(path: str | Path, tokens_per_image: int, width: int, *, dtype: str = "float16",
                       chunk_rows: int = 16):
    """A new on-disk token store of ``dtype`` (one of TOKEN_DTYPES)."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, not {dtype!r}")
    if dtype == "int8":
        return Int8ZarrTokenStore.create(path, tokens_per_image, width, chunk_rows=chunk_rows)
    return ZarrTokenStore.create(path, tokens_per_image, width, dtype=dtype, chunk_rows=chunk_rows)


def open_token_store(path: str | Path, *, mode: str = "r"):
    """Open whichever token store lives at ``path``."""
    try:
        node = json.loads((Path(path) / "zarr.json").read_text()).get("node_type")
    except (OSError, ValueError):
        node = None
    if node == "group":
        return Int8ZarrTokenStore.open(path, mode=mode)
    return ZarrTokenStore.open(path, mode=mode)


class SegmentTokenStore:
    """The index's token store: rows in append-only segments (see segments.py), local or fsspec URL.

    float16/float32 tokens are one segment array; int8 tokens are two (``q`` int8 and one float16
    scale per token), dequantized on read. ``get`` raises IndexCorrupt for a missing or short
    segment: a reranker never sees zeros in place of an image.
    """

    def __init__(self, base_url: str, tokens_per_image: int, width: int, dtype: str,
                 segments: dict[str, list[tuple[int, int]]] | None = None):
        from .segments import SegmentArray

        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, not {dtype!r}")
        self.tokens_per_image, self.width, self.token_dtype = tokens_per_image, width, dtype
        segments = segments or {}
        base = str(base_url).rstrip("/")
        if dtype == "int8":
            self.arrays = {"tokens": SegmentArray(f"{base}/tokens", (tokens_per_image, width), "int8",
                                                  segments.get("tokens", ())),
                           "token_scales": SegmentArray(f"{base}/token_scales", (tokens_per_image, 1), "float16",
                                                        segments.get("token_scales", ()))}
        else:
            self.arrays = {"tokens": SegmentArray(f"{base}/tokens", (tokens_per_image, width), dtype,
                                                  segments.get("tokens", ()))}

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.token_dtype)

    def __len__(self) -> int:
        return min(len(a) for a in self.arrays.values())

    def set_segments(self, segments: dict[str, list[tuple[int, int]]]) -> None:
        for name, arr in self.arrays.items():
            arr.set_segments(segments.get(name, ()))

    def get(self, rows) -> np.ndarray:
        idx = _check_rows(rows, len(self))
        if self.token_dtype == "int8":
            out = dequantize(self.arrays["tokens"].get(idx), self.arrays["token_scales"].get(idx))
        else:
            out = self.arrays["tokens"].get(idx)
        # the read-time check the format allows cheaply (a pass over the k rows a rerank reads
        # anyway): damaged tokens fail the query instead of silently reordering its hits
        if not np.isfinite(out).all():
            bad = idx[~np.isfinite(out.reshape(len(idx), -1)).all(axis=1)]
            where = self.arrays["tokens"].url
            raise IndexCorrupt(f"stored tokens of rows {sorted(set(bad.tolist()))[:8]} under {where} "
                               f"hold NaN or infinite values (run `edje-search verify`, then `repair`)")
        return out

    def write_segment(self, start: int, tokens: np.ndarray) -> list[tuple[str, int, int]]:
        """Write rows [start, start + b) as new segments; returns the (store, start, count) to commit."""
        if self.token_dtype == "int8":
            q, scale = quantize_per_token(tokens)
            return [("tokens", *self.arrays["tokens"].write_segment(start, q)),
                    ("token_scales", *self.arrays["token_scales"].write_segment(start, scale))]
        return [("tokens", *self.arrays["tokens"].write_segment(start, tokens))]

"""The index's image tokens (N, m, d): what the reranker reads at query time.

On disk (or object storage) a Zarr v3 group ``tokens.zarr`` that any Zarr reader opens::

    tokens.zarr/zarr.json          group; attributes["edje_search"] says what the arrays hold
    tokens.zarr/tokens/            (rows, m, d) float16, float32 or int8
    tokens.zarr/token_scales/      int8 indexes only: (rows, m, 1) float16, one scale per token
                                   (inner chunks of a shard; of one row in older int8 indexes)

An int8 token is dequantised as ``tokens[r].astype(float32) * token_scales[r]``. Only the rows
the manifest lists as live are images; rows between commits were never written (reading one is
an error, by design). Each array is a :class:`~.zarr_rows.ZarrRows`.
"""
from __future__ import annotations

import json
from typing import NamedTuple, Sequence

import numpy as np

from ..errors import IndexCorrupt
from .checksums import all_finite, non_finite_rows
from .zarr_io import SCALES_POOL, open_kvstore
from .zarr_rows import ZarrRows

TOKEN_DTYPES = ("float16", "float32", "int8")
TOKENS_GROUP = "tokens.zarr"
LAYOUT = "zarr3"  # the manifest setting ``token_store`` of an index keeping its tokens here


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


class StoredTokens(NamedTuple):
    """Tokens as stored: ``values`` (k, m, d) in the store's dtype and, for int8, ``scales``
    (k, m, 1) float16 (None otherwise). What a rerank reads; it casts them itself (ranking.py)."""
    values: np.ndarray
    scales: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        return self.values if self.scales is None else dequantize(self.values, self.scales)


def group_attributes(tokens_per_image: int, width: int, dtype: str, fingerprint: str) -> dict:
    """What a reader of ``tokens.zarr`` needs to know, under the ``edje_search`` attribute."""
    return {"edje_search": {
        "content": "compressed vision tokens per image, read by the joint-encoder reranker",
        "model_fingerprint": fingerprint,
        "tokens_per_image": tokens_per_image, "token_width": width, "dtype": dtype,
        "dequantise": ("tokens[r].astype('float32') * token_scales[r]" if dtype == "int8"
                       else "none: tokens[r] is the token matrix"),
        "rows": "row r is the image the index manifest (manifest.sqlite, table rows) names with row r; "
                "rows between commits were never written",
    }}


class TokenStore:
    """The tokens of one index: ``tokens`` (and, for int8, ``token_scales``) Zarr arrays.

    ``get`` dequantises int8 and raises IndexCorrupt for a missing or damaged row, or one
    holding NaN/inf: a reranker never sees zeros or garbage in place of an image.
    """

    def __init__(self, base_url: str, tokens_per_image: int, width: int, dtype: str, shard_rows: int,
                 segments: dict[str, list[tuple[int, int]]] | None = None, scale_chunk_rows: int | None = None):
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, not {dtype!r}")
        self.tokens_per_image, self.width, self.token_dtype = tokens_per_image, width, dtype
        self.url = f"{str(base_url).rstrip('/')}/{TOKENS_GROUP}"
        segments = segments or {}
        self.arrays = {"tokens": ZarrRows(f"{self.url}/tokens", (tokens_per_image, width), dtype, shard_rows,
                                          segments.get("tokens", ()))}
        if dtype == "int8":
            scale_chunk_rows = scale_chunk_rows or shard_rows
            # a row's scales are 128 bytes: chunked a shard at a time and cached (zarr_io.SCALES_POOL),
            # they are read once per shard instead of once per row, so a gather costs one byte range
            # per row like float16's (an index that chunks them per row reads them uncached)
            self.arrays["token_scales"] = ZarrRows(f"{self.url}/token_scales", (tokens_per_image, 1), "float16",
                                                   shard_rows, segments.get("token_scales", ()), scale_chunk_rows,
                                                   SCALES_POOL if scale_chunk_rows > 1 else None)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.token_dtype)

    @property
    def shard_rows(self) -> int:
        return self.arrays["tokens"].shard_rows

    def __len__(self) -> int:
        return min(len(a) for a in self.arrays.values())

    def reopen(self) -> None:
        """Check once, on the next reads, everything cached before (see zarr_rows.py)."""
        for arr in self.arrays.values():
            arr.reopen()

    def set_segments(self, segments: dict[str, list[tuple[int, int]]]) -> None:
        for name, arr in self.arrays.items():
            arr.set_segments(segments.get(name, ()))

    def get(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows in the order asked -> (k, m, d) tokens (float32 for int8 stores)."""
        return self.read(rows).dequantized()

    def read(self, rows: Sequence[int] | np.ndarray) -> StoredTokens:
        """Rows in the order asked, as stored (int8 with their scales): the gather of a rerank,
        which leaves the cast to float32 to the reranker's own tensors."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.token_dtype == "int8":
            q, scales = self.arrays["tokens"], self.arrays["token_scales"]
            pending = q.start_read(idx), scales.start_read(idx)
            out = StoredTokens(q.read_started(pending[0]), scales.read_started(pending[1]))
        else:
            out = StoredTokens(self.arrays["tokens"].get(idx))
        # a pass over the k rows a rerank reads anyway (for int8 only the scales can hold NaN or
        # inf): damaged tokens fail the query instead of silently reordering its hits
        floats = out.values if out.scales is None else out.scales
        if not all_finite(floats):
            bad = idx[non_finite_rows(floats)]
            raise IndexCorrupt(f"stored tokens of rows {sorted(set(bad.tolist()))[:8]} under {self.url} "
                               f"hold NaN or infinite values (run `edje-search verify`, then `repair`)")
        return out

    def write_segment(self, start: int, tokens: np.ndarray) -> list[tuple[str, int, int]]:
        """Write rows [start, start + b); returns the (array, start, count) spans to commit."""
        if self.token_dtype == "int8":
            q, scale = quantize_per_token(tokens)
            return [("tokens", *self.arrays["tokens"].write_segment(start, q)),
                    ("token_scales", *self.arrays["token_scales"].write_segment(start, scale))]
        return [("tokens", *self.arrays["tokens"].write_segment(start, tokens))]

    def published_rows(self) -> int | None:
        """The row count the tokens array's ``zarr.json`` shows (None: missing or unreadable)."""
        meta = self.arrays["tokens"].read_metadata()
        try:
            return int(meta["shape"][0])
        except (KeyError, TypeError, IndexError, ValueError):
            return None

    def publish(self, rows: int, fingerprint: str) -> None:
        """Write the group's and arrays' ``zarr.json`` for ``rows`` committed rows, so that plain
        Zarr readers see every committed row (done after each commit, and by the next writer
        when a crash came in between)."""
        attrs = group_attributes(self.tokens_per_image, self.width, self.token_dtype, fingerprint)
        group = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        open_kvstore(self.url).write("zarr.json", json.dumps(group, indent=1).encode()).result()
        for arr in self.arrays.values():
            arr.write_metadata(rows, attrs)

"""Search restricted to the rows a filter selects, so the top k comes from those rows only.

Rows are selected in SQL (storage/filters.py compiles the filter into a condition with bound
parameters), then searched one of two ways:

* few rows (at most :data:`EXACT_MAX_ROWS`): their stored vectors are scored exactly, which is
  the brute-force answer and cheaper than any index walk at that size;
* more rows: FAISS searches every segment with an ``IDSelectorBatch`` of the selected rows in
  its SearchParameters, so non-selected rows never take a slot of the k. An IVF index probes
  ``PROBE_MARGIN x nprobe / selectivity`` lists (capped at all of them): the filtered neighbours
  lie further from the query than unfiltered ones, in lists a plain nprobe would not reach. A
  query that still gets fewer than k hits while k rows pass is answered exactly.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from . import vector_index
from .filters import INDEXED_FIELDS, builtin_fields, compile_filter, meta_expr
from .layout import REFINE_FACTOR
from .manifest import Manifest, prefix_end

if TYPE_CHECKING:
    from .index_store import IndexStore

# at most this many selected rows are scored exactly: 10,000 rows took 0.66 ms that way against
# 3.1 ms through the selector (200,000-row IVF index, benchmarks/results/filtered_200k.json)
EXACT_MAX_ROWS = 20_000
# the tuned nprobe sits at the edge of its recall target for unfiltered search; a filtered search
# probes this many times more (after dividing by the selectivity), which kept recall@10 >= 0.95 at
# 50% and 5% selectivity on 200k clustered vectors (benchmarks/filtered.py)
PROBE_MARGIN = 2
EXACT_CHUNK = 65_536  # rows scored per step of an exact scan (bounds its memory)
_FIELD_SAMPLE = 10_000  # rows sampled to list user fields in error messages


def has_user_field(manifest: Manifest):
    """``known(name)``: does any row carry a user field of that name?"""
    def known(name: str) -> bool:
        return bool(manifest.select("SELECT 1 FROM rows WHERE json_extract(meta, ?) IS NOT NULL LIMIT 1",
                                    (f'$."{name}"',)))
    return known


def describe_fields(manifest: Manifest):
    """``describe()``: every field available, built-in then user fields (sampled), for error messages."""
    def describe() -> str:
        got = manifest.select(f"SELECT DISTINCT j.key FROM (SELECT meta FROM rows WHERE meta IS NOT NULL "
                              f"ORDER BY row DESC LIMIT {_FIELD_SAMPLE}) r, json_each(r.meta) j")
        fields = list(builtin_fields())
        fields += sorted(k for (k,) in got if isinstance(k, str) and k not in fields)
        return ", ".join(fields)
    return describe


def ensure_field_indexes(manifest: Manifest) -> None:
    """Create the manifest's expression indexes on INDEXED_FIELDS if missing (a writer calls this;
    on an index with many rows the first call builds them, once). A selective filter on those
    fields then reads an index range instead of every row's JSON."""
    for name in INDEXED_FIELDS:
        manifest.ensure_index(f"rows_meta_{name}", meta_expr(name))


def select_rows(store: "IndexStore", where: str | None = None, under: str | None = None) -> np.ndarray:
    """Live rows (sorted) passing the filter ``where`` and lying under folder ``under``."""
    manifest = store.manifest
    sql = [Manifest.live_condition(store.generation)]
    params: list = []
    if where:
        cond, p = compile_filter(where, has_user_field(manifest), describe_fields(manifest))
        sql.append(cond)
        params += p
    if under:
        lo = os.fsencode(os.path.abspath(under).rstrip(os.sep) + os.sep)
        sql.append("path >= ? AND path < ?")  # a range on the path index, like live_under
        params += [lo, prefix_end(lo)]
    got = manifest.select(f"SELECT row FROM rows WHERE {' AND '.join(sql)} ORDER BY row", params)
    return np.fromiter((r for (r,) in got), dtype=np.int64, count=len(got))


def exact_search(store: "IndexStore", queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over ``rows``' stored vectors: (scores (Q, k), rows (Q, k)), -1 padded."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.full((len(q), 0), -1, np.int64)
    for s in range(0, len(rows), EXACT_CHUNK):
        part = rows[s:s + EXACT_CHUNK]
        sims = q @ store.vectors(part).astype(np.float32).T
        best_s = np.concatenate([best_s, sims], axis=1)
        best_r = np.concatenate([best_r, np.broadcast_to(part, sims.shape)], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    order = np.lexsort((best_r, -best_s), axis=1)[:, :k] if best_s.size else np.zeros((len(q), 0), np.int64)
    best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
    pad = k - best_s.shape[1]
    if pad > 0:
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_r = np.pad(best_r, ((0, 0), (0, pad)), constant_values=-1)
    return best_s.astype(np.float32), best_r.astype(np.int64)


def search_rows(store: "IndexStore", queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` among ``rows`` (live, sorted) for each query: (scores (Q, k), rows (Q, k)), -1 padded."""
    if len(rows) <= EXACT_MAX_ROWS:
        return exact_search(store, queries, k, rows)
    recipe = store.recipe
    want = k * REFINE_FACTOR if vector_index.needs_refine(recipe) else k
    nprobe = store.settings.get("nprobe")
    lists = vector_index.n_lists(recipe)
    if lists:
        fraction = len(rows) / max(len(store), 1)
        nprobe = min(lists, math.ceil(PROBE_MARGIN * (nprobe or 1) / fraction))
    scores, found = vector_index.search_segments(store.faiss_segments, queries, want, include=rows,
                                                 nprobe=nprobe, ef_search=store.settings.get("ef_search"))
    if want != k:
        scores, found = vector_index.refine_exact(np.asarray(queries, np.float32), found, k, store.vectors)
    short = np.nonzero((found >= 0).sum(axis=1) < min(k, len(rows)))[0]
    if len(short):  # a probe that missed: this query gets the exact answer
        scores[short], found[short] = exact_search(store, np.asarray(queries)[short], k, rows)
    return scores, found

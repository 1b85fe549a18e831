"""Duplicate images in an index: exact copies by content hash, near-duplicates by first-stage vectors.

Exact copies share the sha256 every build records (one SQL GROUP BY on the indexed hash
column). Near-duplicates (resized, recompressed, lightly cropped copies) are pairs of rows whose
first-stage embeddings have cosine similarity >= a threshold: FAISS ``range_search`` over the
index's own segments finds the candidates (removed rows excluded by an ID selector), each pair
is then re-scored exactly from the stored vectors, and pairs are joined into groups (connected
components). No model is loaded.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from . import vector_index
from .manifest import Manifest

if TYPE_CHECKING:
    from .index_store import IndexStore

# the highest threshold whose recall of planted resized, recompressed and cropped copies reached
# 0.95 with the demo model (benchmarks/near_duplicates.py, results/near_duplicates_demo.json)
DEFAULT_THRESHOLD = 0.915
QUERY_CHUNK = 2048  # rows sent to range_search at once (bounds the result lists held in memory)


@dataclasses.dataclass
class DuplicateGroup:
    kind: str  # "exact" (same content hash) or "near" (first-stage similarity >= threshold)
    rows: list[int]
    paths: list[str]
    similarity: float  # the lowest similarity of the pairs that joined the group (1.0 for exact copies)


def exact_groups(store: "IndexStore") -> list[DuplicateGroup]:
    """Live files with identical content, grouped by hash (rows in order)."""
    live = Manifest.live_condition(store.generation)
    got = store.manifest.select(
        f"SELECT sha256, row, path FROM rows WHERE {live} AND sha256 IN (SELECT sha256 FROM rows WHERE {live} "
        f"AND sha256 IS NOT NULL GROUP BY sha256 HAVING COUNT(*) > 1) ORDER BY sha256, row")
    groups: dict[str, list[int]] = {}
    for sha, row, _ in got:
        groups.setdefault(sha, []).append(int(row))
    paths = store.paths([r for rows in groups.values() for r in rows])
    return [DuplicateGroup("exact", rows, [paths[r] for r in rows], 1.0) for rows in groups.values()]


def near_pairs(store: "IndexStore", threshold: float) -> list[tuple[int, int, float]]:
    """(row a, row b, cosine) with a < b for every live pair at or above ``threshold``, exact scores."""
    live = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    if len(live) < 2:
        return []
    sel = None
    if len(store.tombstones):
        sel = vector_index.faiss.IDSelectorNot(vector_index.faiss.IDSelectorBatch(store.tombstones))
    # FAISS keeps results strictly above the radius; lossy codes are loose, so search a little
    # wider and let the exact re-score decide
    radius = threshold - (0.05 if vector_index.needs_refine(store.recipe) else 1e-6)
    nprobe = store.settings.get("nprobe")
    found: set[tuple[int, int]] = set()
    for s in range(0, len(live), QUERY_CHUNK):
        rows = live[s:s + QUERY_CHUNK]
        q = np.ascontiguousarray(store.vectors(rows), dtype=np.float32)
        for seg in store.faiss_segments:
            if seg.ntotal == 0:
                continue
            params = vector_index._params(seg, sel, nprobe, store.settings.get("ef_search"))
            lims, _, ids = seg.range_search(q, float(radius), params=params)
            for i, a in enumerate(rows.tolist()):
                for b in ids[lims[i]:lims[i + 1]].tolist():
                    if a != b:
                        found.add((min(a, b), max(a, b)))
    if not found:
        return []
    pairs = np.array(sorted(found), dtype=np.int64)
    uniq, inv = np.unique(pairs, return_inverse=True)
    vecs = store.vectors(uniq).astype(np.float32)
    inv = inv.reshape(pairs.shape)
    sims = np.einsum("nd,nd->n", vecs[inv[:, 0]], vecs[inv[:, 1]])
    keep = sims >= threshold
    return [(int(a), int(b), float(x)) for (a, b), x in zip(pairs[keep], sims[keep])]


def near_groups(store: "IndexStore", threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Groups of rows joined by near-duplicate pairs whose files' content differs (identical
    content is reported by :func:`exact_groups`). A group is a connected component: A~B and B~C
    put A, B and C together even when A and C are further apart."""
    pairs = near_pairs(store, threshold)
    entries = store.entries_of_rows({r for a, b, _ in pairs for r in (a, b)})
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    lowest: dict[int, float] = {}
    for a, b, sim in pairs:
        ha, hb = entries[a].sha256, entries[b].sha256
        if ha is not None and ha == hb:
            continue
        ra, rb = root(a), root(b)
        low = min(sim, lowest.pop(ra, 1.0), lowest.pop(rb, 1.0) if rb != ra else 1.0)
        parent[ra] = rb
        lowest[rb] = low
    members: dict[int, list[int]] = {}
    for x in list(parent):
        members.setdefault(root(x), []).append(x)
    out = [DuplicateGroup("near", sorted(rows), [entries[r].path for r in sorted(rows)], lowest.get(r, 1.0))
           for r, rows in members.items() if len(rows) > 1]
    return sorted(out, key=lambda g: g.rows[0])


def find_duplicates(store: "IndexStore", threshold: float = DEFAULT_THRESHOLD) -> dict[str, list[DuplicateGroup]]:
    """{"exact": groups of identical files, "near": groups of near-duplicates at ``threshold``}."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity between -1 and 1, got {threshold}")
    return {"exact": exact_groups(store), "near": near_groups(store, threshold)}


def collapse_near(store: "IndexStore", rows: list[int], threshold: float = DEFAULT_THRESHOLD) -> list[list[int]]:
    """Greedy de-duplication of a ranked list (as clip-retrieval's ``deduplicate``): walking ``rows``
    in order, a row whose first-stage similarity to an earlier kept row is >= ``threshold`` joins
    that row instead of being kept. Returns [[kept row, rows it absorbed...], ...] in rank order."""
    if not rows:
        return []
    vecs = store.vectors(np.asarray(rows, dtype=np.int64))
    return [[rows[i] for i in group] for group in collapse_vectors(vecs, threshold)]


def collapse_vectors(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """The rule of :func:`collapse_near` on (n, E) L2-normalised embeddings in rank order:
    positions grouped as [[kept, absorbed...], ...], a position joining the first earlier kept
    one whose cosine with it is >= ``threshold``."""
    vecs = np.asarray(vectors, dtype=np.float32)
    sims = vecs @ vecs.T
    kept: list[int] = []  # positions
    groups: list[list[int]] = []
    for i in range(len(vecs)):
        home = next((j for j, k in enumerate(kept) if sims[i, k] >= threshold), None)
        if home is None:
            kept.append(i)
            groups.append([i])
        else:
            groups[home].append(i)
    return groups

"""Keeping FAISS fast as an index grows, each step one commit of the FAISS segment list.

Commits add small flat segments; :func:`optimize` merges runs of ``MERGE_FANOUT`` segments of
similar size (a log-structured merge: each row is re-encoded O(log n) times), and when the
index has grown past the size where another recipe pays (storage/vector_index.choose_recipe)
it trains that recipe on a sample of the stored vectors, re-encodes every live row and tunes
``nprobe``/``efSearch`` for ``TARGET_RECALL`` against exact search.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import layout, vector_index

if TYPE_CHECKING:
    from .index_store import IndexStore

logger = logging.getLogger(__name__)

MERGE_FANOUT = 8  # merge a run of this many similar-sized FAISS segments into one
TARGET_RECALL = 0.95


def optimize(store: IndexStore) -> dict:
    """Keep FAISS fast as the index grows (run by writers after their commits, not inside them).

    Retrains when the recipe for the current size differs from the one in use (after enough
    rows to train it: 39 per inverted list), re-encoding every live row into one segment;
    otherwise merges runs of MERGE_FANOUT similar-sized segments. Returns what it did.
    """
    store.require_lock()
    target = store.config.factory if store.config.factory != vector_index.AUTO else \
        vector_index.choose_recipe(len(store), store.config.dim)
    if target != store.recipe and len(store) >= max(vector_index.training_rows(target), 1):
        return retrain(store, target)
    merged = 0
    while True:
        run = mergeable_run(store)
        if not run:
            break
        merge(store, run)
        merged += 1
    return {"action": "merge" if merged else "none", "merges": merged, "segments": len(store.faiss_files)}


def mergeable_run(store: IndexStore) -> list[tuple[str, str, int, int]] | None:
    """Segments to merge next: MERGE_FANOUT flat deltas waiting for a trained recipe, or a run of
    MERGE_FANOUT segments of one recipe and similar size (so each row is re-encoded O(log n) times)."""
    segs = store.snapshot.faiss_segments
    if store.recipe != "Flat":
        deltas = [seg for seg in segs if seg[1] != store.recipe]
        if len(deltas) >= MERGE_FANOUT:
            return deltas[:MERGE_FANOUT]
    tier = [int(np.log(max(e - a, 1)) / np.log(MERGE_FANOUT)) for _, _, a, e in segs]
    i = 0
    while i < len(segs):
        j = i
        while j < len(segs) and tier[j] == tier[i] and segs[j][1] == segs[i][1]:
            j += 1
        if j - i >= MERGE_FANOUT:
            return segs[i:i + MERGE_FANOUT]
        i = j
    return None


def live_rows_in(store: IndexStore, first: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, vectors) of the live rows in [first, end), read from the stored vectors."""
    dead = store.tombstones
    rows_out, vecs_out = [], []
    for s, vecs in store.vector_array.iter_rows(first=first, end=end):
        rows = np.arange(s, s + len(vecs), dtype=np.int64)
        keep = ~np.isin(rows, dead)
        rows_out.append(rows[keep])
        vecs_out.append(vecs[keep])
    if not rows_out:
        return np.zeros(0, np.int64), np.zeros((0, store.config.dim), np.float32)
    return np.concatenate(rows_out), np.concatenate(vecs_out)


def merge(store: IndexStore, run: list[tuple[str, str, int, int]]) -> None:
    first, end, recipe = run[0][2], run[-1][3], store.recipe
    gen = store.generation + 1
    rows, vecs = live_rows_in(store, first, end)
    index = vector_index.new_segment_index(recipe, store.config.dim, faiss_template(store))
    if len(rows):
        index.add_with_ids(np.ascontiguousarray(vecs), rows)
    name = f"seg-{first:012d}-g{gen}.index"
    store.write_faiss(index, name)
    names = {n for n, *_ in run}
    faiss_list = [s for s in store.snapshot.faiss_segments if s[0] not in names] + [(name, recipe, first, end)]
    faiss_list.sort(key=lambda s: s[2])
    commit_faiss(store, faiss_list, store.settings)
    logger.info("merged %d FAISS segments of rows [%d, %d) into %s", len(run), first, end, name)


def faiss_template(store: IndexStore):
    """The trained, empty index new segments of the recipe are cloned from (None for Flat)."""
    name = store.settings.get("template")
    return vector_index.read_index(store.directory / layout.FAISS_DIR / name) if name else None


def commit_faiss(store: IndexStore, faiss_list: list, settings: dict) -> None:
    """A commit that changes only the FAISS segment list and settings."""
    old = set(store.faiss_files) | {store.settings.get("template", "")}
    store.manifest.commit(generation=store.generation + 1, n_rows=store.n_rows, faiss_segments=faiss_list,
                         settings=settings)
    layout.fault("after_optimize_commit")
    store.adopt(store.manifest.snapshot())
    keep = set(store.faiss_files) | {store.settings.get("template", "")}
    for name in old - keep:  # readers holding these keep their open memory maps
        if name:
            (store.directory / layout.FAISS_DIR / name).unlink(missing_ok=True)


def retrain(store: IndexStore, recipe: str) -> dict:
    """Train ``recipe`` on a sample of the stored vectors, re-encode every live row into one
    segment, and tune nprobe for TARGET_RECALL against exact search. One commit."""
    faiss_list, settings, done = encode_all(store, recipe)
    commit_faiss(store, faiss_list, settings)
    return done


def encode_all(store: IndexStore, recipe: str, exclude: Sequence[int] = ()) -> tuple[list, dict, dict]:
    """New FAISS files holding every live row but ``exclude`` with ``recipe`` (written, not yet
    committed): (FAISS segment list, settings, what was done)."""
    gen = store.generation + 1
    rows, vecs = live_rows_in(store, 0, store.n_rows)
    if len(exclude):
        keep = ~np.isin(rows, np.asarray(exclude, dtype=np.int64))
        rows, vecs = rows[keep], vecs[keep]
    template = vector_index.new_segment_index(recipe, store.config.dim)
    if not template.is_trained:
        n_train = min(len(rows), max(vector_index.training_rows(recipe), 64 * vector_index.n_lists(recipe)))
        sample = np.random.default_rng(gen).choice(len(rows), n_train, replace=False)
        logger.info("training FAISS recipe %s on %d of %d vectors", recipe, n_train, len(rows))
        vector_index.use_gpu_for_training(template)
        template.train(np.ascontiguousarray(vecs[np.sort(sample)]))
    settings = {k: v for k, v in store.settings.items() if k not in ("nprobe", "ef_search", "template")}
    settings["recipe"] = recipe
    if template.is_trained and vector_index.training_rows(recipe):
        tname = f"template-g{gen}.index"
        store.write_faiss(template, tname)
        settings["template"] = tname
    index = vector_index.faiss.clone_index(template)
    for s in range(0, len(rows), 100_000):
        index.add_with_ids(np.ascontiguousarray(vecs[s:s + 100_000]), rows[s:s + 100_000])
    name = f"seg-{0:012d}-g{gen}.index"
    store.write_faiss(index, name)
    recall = None
    knob = "nprobe" if vector_index.n_lists(recipe) else "ef_search" if "HNSW" in recipe else None
    if knob and len(rows):
        settings[knob], recall = tune_recall(index, rows, vecs, recipe, knob, k=10, target=TARGET_RECALL,
                                             refine=vector_index.needs_refine(recipe))
    logger.info("FAISS recipe %s (nprobe %s, efSearch %s, recall@10 %s)", recipe, settings.get("nprobe"),
                settings.get("ef_search"), recall)
    return ([(name, recipe, 0, store.n_rows)], settings,
            {"action": "retrain", "recipe": recipe, "nprobe": settings.get("nprobe"),
             "ef_search": settings.get("ef_search"), "recall_at_10": recall})


def tune_recall(index, rows: np.ndarray, vectors: np.ndarray, recipe: str, knob: str, *, k: int, target: float,
                refine: bool, n_queries: int = 200, seed: int = 0) -> tuple[int, float]:
    """Smallest power of two for ``knob`` (IVF ``nprobe`` or HNSW ``ef_search``) whose recall@k
    against exact search reaches ``target`` (like faiss.contrib's operating points, one target).

    ``rows`` (sorted) are the ids of ``vectors``. Queries are stored vectors with noise added
    (a query is near, not equal to, an image).
    """
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    q = vectors[pick] + rng.normal(0, 0.5 / np.sqrt(vectors.shape[1]), (len(pick), vectors.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = rows[vector_index.exact_top_k(vectors, q, k)]
    value, top = (1, vector_index.n_lists(recipe)) if knob == "nprobe" else (16, 4096)
    while True:
        want = k * layout.REFINE_FACTOR if refine else k
        _, got = vector_index.search_segments([index], q, want, **{knob: value})
        if refine:  # exact re-score of the candidates, as IndexStore.search does
            pos = np.searchsorted(rows, np.clip(got, 0, None))
            exact = np.einsum("qd,qkd->qk", q, vectors[np.clip(pos, 0, len(rows) - 1)])
            exact[got < 0] = -np.inf
            got = np.take_along_axis(got, np.argsort(-exact, axis=1)[:, :k], 1)
        recall = float(np.mean([len(set(g[:k].tolist()) & set(t.tolist())) / k for g, t in zip(got, truth)]))
        if recall >= target or value >= top:
            return value, recall
        value *= 2

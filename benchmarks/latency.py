"""Query-time costs on synthetic collections: token gathers and end-to-end search by stage.

Speed does not depend on the weights or the data, so the collection is random vectors and
tokens; the query path is the real one (Engine.search over an IndexStore on disk).
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import open_clip

from edje_search.config import FirstStageConfig, IndexConfig
from edje_search.engine import Engine
from edje_search.models.bundle import EdjeModel
from edje_search.models.first_stage import FirstStage
from edje_search.models.registry import bundled_minilm_dir
from edje_search.storage.index_store import IndexStore

from .throughput import joint_encoder
from .timing import median_seconds

QUERIES = ["dog in snow", "a small red circle left of a large blue square", "two children playing football on a beach",
           "a bowl of soup next to a loaf of bread", "city street at night with neon signs", "an old man reading",
           "three green triangles", "a cat sleeping on a laptop keyboard", "sailing boats in a harbour at sunset",
           "a person riding a bicycle past a red wall"]


def _random_rows(start: int, count: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + start)
    return rng.standard_normal((count, 64, width), dtype=np.float32).astype(np.float16)


def gather_latency(directory: Path, n_rows: int, dtype: str, ks=(10, 50, 100), repeats: int = 30) -> dict:
    """Median ms to gather k random live rows through the engine's token store (the Zarr store
    of an index of ``n_rows`` x 64 x 384 tokens; benchmarks/token_gather.py goes to 1M rows)."""
    store = synthetic_index(directory / f"gather-{dtype}-{n_rows}", n_rows, 16, dtype)
    live = np.array([e.row for e in store.iter_entries()], dtype=np.int64)
    rng = np.random.default_rng(1)
    return {f"k={k}": 1000 * median_seconds(lambda k=k: store.tokens.get(rng.choice(live, k, replace=False)),
                                            warmup=3, repeats=repeats) for k in ks}


def paper_text_first_stage() -> FirstStage:
    """SigLIP2 ViT-L/16-384's text tower at full size (random weights), with a stand-in vision tower.

    The query path only runs the text tower; the vision tower is never called at query time.
    The bundled MiniLM tokenizer stands in for SigLIP2's (its ids fit the 256k vocabulary).
    """
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-L-16-SigLIP2-384"))
    cfg["vision_cfg"] = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}
    cfg["text_cfg"].pop("hf_tokenizer_name", None)
    cfg["text_cfg"].pop("tokenizer_kwargs", None)
    return FirstStage(FirstStageConfig(model_cfg=cfg, image_size=32, context_length=64, tokenizer="hf"),
                      tokenizer_dir=bundled_minilm_dir()).eval()


def synthetic_index(directory: Path, n_rows: int, dim: int, token_dtype: str, chunk: int = 20_000) -> IndexStore:
    """An IndexStore of ``n_rows`` random unit vectors and random 64 x 384 tokens."""
    cfg = IndexConfig(factory="Flat", dim=dim, tokens_per_image=64, token_width=384, token_dtype=token_dtype,
                      model_path="synthetic", model_fingerprint="synthetic")
    store = IndexStore.create(directory, cfg)
    for s in range(0, n_rows, chunk):
        b = min(chunk, n_rows - s)
        vec = np.random.default_rng(s).standard_normal((b, dim), dtype=np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        tokens = np.concatenate([_random_rows(s + i, min(4096, b - i), 384) for i in range(0, b, 4096)])
        paths = [f"/synthetic/{s + i:07d}.jpg" for i in range(b)]
        hashes = [hashlib.sha256(p.encode()).hexdigest() for p in paths]
        with store.writing():
            store.commit(paths, hashes, vec, tokens, new_stats=[(0, 0)] * b)
    return store


def query_latency(store_dir: Path, first_stage: FirstStage, backend: str, rerank_ks=(10, 20, 50),
                  repeats: int = 3) -> dict:
    """p50/p95 ms per stage of Engine.search (k=10) at MiniLM-L12 shape, m=64, for each rerank_k."""
    reranker = joint_encoder(12, 64)
    reranker.use_backend(backend)
    engine = Engine(IndexStore.open(store_dir), EdjeModel(first_stage, reranker, name="bench"))
    out = {}
    for rk in rerank_ks:
        engine.search(QUERIES[0], k=10, rerank_k=rk)  # warm-up
        laps = []
        for _ in range(repeats):
            for q in QUERIES:
                engine.search(q, k=10, rerank_k=rk)
                laps.append(engine.last_timings)
        out[f"rerank_k={rk}"] = {stage: {"p50": float(np.percentile([t[stage] for t in laps], 50)),
                                         "p95": float(np.percentile([t[stage] for t in laps], 95))}
                                 for stage in laps[0]}
    return out

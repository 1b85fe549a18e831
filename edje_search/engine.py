"""The search engine: one object owning the index and the model.

Query flow: embed text -> FAISS top rerank_k -> gather stored tokens -> joint-encoder scores
-> hits sorted by rerank score.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .config import IndexConfig
from .devices import pick_device
from .images import iter_image_files
from .models.bundle import EdjeModel
from .models.registry import load_model
from .pipeline import embed_files
from .storage import vector_index
from .storage.index_store import IndexError_, IndexStore
from .storage.token_store import bytes_per_image, working_dtype

MAX_QUERY_CHARS = 2000


class ModelMismatch(RuntimeError):
    """The index was built with a different model than the one given."""


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result.

    ``rerank_score`` is the joint encoder's logit and ``score`` what the hit was ranked by:
    ``rerank_score + fusion_weight * first_stage_score`` (the model's fusion weight, 0 by
    default). Both are None for hits beyond the reranked pool, which keep first-stage order.
    """

    rank: int
    row: int
    path: str
    first_stage_score: float
    rerank_score: float | None
    score: float | None = None


@dataclasses.dataclass
class BuildReport:
    added: int = 0
    unchanged: int = 0
    removed: int = 0
    duplicates: int = 0  # added by copying the rows of identical content, without a model pass
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.added} added ({self.duplicates} duplicates of indexed content), {self.unchanged} unchanged, "
                f"{self.removed} removed, {len(self.skipped)} skipped")


def _file_stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


class StageClock:
    """Wall-clock milliseconds per named stage, in order."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + 1000 * (now - self._last)
        self._last = now


def _check_query(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty query: give some text to search for")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("query is not valid UTF-8 text") from e
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(f"query too long ({len(text)} characters; the limit is {MAX_QUERY_CHARS})")
    return text


class Engine:
    """Two-stage image search over one index directory."""

    def __init__(self, store: IndexStore, model: EdjeModel):
        self.store = store
        self.model = model
        self.last_timings: dict[str, float] = {}  # milliseconds per stage of the latest search

    # -------------------------------------------------------------------------- construction
    @classmethod
    def create(cls, index_dir: str | Path, model: EdjeModel, *, factory: str = "Flat",
               chunk_rows: int = 16, token_dtype: str = "float16") -> "Engine":
        """A new, empty index in ``index_dir`` for ``model``; ``token_dtype`` float16, float32 or int8
        (int8 with a scale per token halves the storage; see benchmarks for its accuracy cost)."""
        index_dir = Path(index_dir)
        if model.path is None:  # a recipe built in memory: keep a copy beside the index
            model.save_pretrained(index_dir / "model")
        config = IndexConfig(
            factory=factory, dim=model.first_stage.embed_dim,
            tokens_per_image=model.reranker.config.tokens_per_image,
            token_width=model.reranker.token_width, token_dtype=token_dtype,
            model_path=str(model.path), model_fingerprint=model.fingerprint(), chunk_rows=chunk_rows,
        )
        return cls(IndexStore.create(index_dir, config), model)

    @classmethod
    def from_pretrained(cls, index_dir: str | Path, *, model: EdjeModel | str | None = None,
                        writable: bool = False, device: str | torch.device | None = None,
                        backend: str = "eager") -> "Engine":
        """Open an index; the model defaults to the one it was built with. ``backend`` picks how the
        reranker runs (eager, bf16, dynamic-int8, onnx, onnx-int8; see models/backends.py)."""
        store = IndexStore.open(index_dir, mode="r+" if writable else "r")
        if model is None:
            model_path = store.config.model_path
            if not Path(model_path).is_dir():
                raise IndexError_(f"the model this index was built with is gone: {model_path} "
                                  f"(pass --model with that model)")
            model = load_model(model_path)
        elif isinstance(model, (str, Path)):
            model = load_model(model)
        if model.fingerprint() != store.config.model_fingerprint:
            raise ModelMismatch(
                f"index {index_dir} was built with model {store.config.model_fingerprint} "
                f"({store.config.model_path}) but the model given is {model.fingerprint()} ({model.path}); "
                f"use that model or rebuild the index")
        model.to(pick_device(device)).eval()
        model.reranker.use_backend(backend)
        return cls(store, model)

    def refresh(self) -> bool:
        """Pick up commits made by another writer since this engine opened; True if it changed.

        A reader switches generations as a whole (manifest, FAISS file and row count together),
        so a search sees the old state or the new one, never a mix.
        """
        state = IndexStore.read_state(self.store.directory)
        if state["generation"] == self.store.generation:
            return False
        self.store = IndexStore.open(self.store.directory, mode=self.store.mode)
        return True

    # ------------------------------------------------------------------------------- indexing
    def add(self, paths: Iterable[str | Path], *, batch_size: int = 32, num_workers: int = 2,
            commit_every: int = 512, progress: bool = True, report: BuildReport | None = None,
            removed_rows: Sequence[int] = ()) -> BuildReport:
        """Embed and commit image files (commits every ``commit_every`` images).

        ``removed_rows`` are dropped in the first commit (how changed files are replaced
        without a commit of their own); their paths count as new.
        """
        report = report or BuildReport()
        to_remove = list(removed_rows)
        dropped = set(to_remove)
        live = [e for e in self.store.entries if e.row not in dropped]
        known = {e.path for e in live}
        todo = []
        for p in paths:
            p = os.path.abspath(p)
            if p in known:
                report.unchanged += 1
            else:
                todo.append(p)
        pending: list = []
        n_pending = 0
        row_of_hash = {e.sha256: e.row for e in live}
        for batch in embed_files(self.model, todo, batch_size=batch_size, num_workers=num_workers,
                                 token_dtype=working_dtype(self.store.config.token_dtype), progress=progress,
                                 known_hashes=frozenset(row_of_hash)):
            report.skipped.extend(batch.failed)
            if batch.duplicates:  # same content as an indexed file: copy its rows, no model pass
                report.duplicates += len(batch.duplicates)
                rows = [row_of_hash[h] for _, h, _ in batch.duplicates]
                batch.paths += [p for p, _, _ in batch.duplicates]
                batch.hashes += [h for _, h, _ in batch.duplicates]
                batch.stats += [st for _, _, st in batch.duplicates]
                batch.vectors = np.concatenate([batch.vectors, self.store.vectors(rows)])
                batch.tokens = np.concatenate([batch.tokens, self.store.tokens.get(rows)])
            if batch.paths:
                pending.append(batch)
                n_pending += len(batch.paths)
            if n_pending >= commit_every:
                report.added += self._commit(pending, to_remove)
                pending, n_pending, to_remove = [], 0, []
        report.added += self._commit(pending, to_remove)
        return report

    def _commit(self, batches: list, removed_rows: Sequence[int] = ()) -> int:
        if not batches and not removed_rows:
            return 0
        paths = [p for b in batches for p in b.paths]
        stats = [st for b in batches for st in b.stats]
        hashes = [h for b in batches for h in b.hashes]
        dim = self.store.config.dim
        vectors = np.concatenate([b.vectors for b in batches]) if batches else np.zeros((0, dim), np.float32)
        tokens = np.concatenate([b.tokens for b in batches]) if batches else np.zeros(
            (0, self.store.config.tokens_per_image, self.store.config.token_width), np.float16)
        self.store.commit(paths, hashes, vectors, tokens, removed_rows=removed_rows, new_stats=stats)
        return len(paths)

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Drop the rows of these files; returns how many were indexed."""
        wanted = {os.path.abspath(p) for p in paths}
        rows = [e.row for e in self.store.entries if e.path in wanted]
        if rows:
            self._commit([], removed_rows=rows)
        return len(rows)

    def sync(self, root: str | Path, *, chunk_files: int = 4096, **kwargs) -> BuildReport:
        """Make the index mirror the images under ``root``: add new files, re-embed changed ones
        (size or modification time differ), drop deleted ones.

        The folder is walked as a stream and processed ``chunk_files`` paths at a time, so work
        starts at once on very large folders; deletions are applied once the walk has ended.
        """
        root_abs = os.path.abspath(root)
        prefix = root_abs.rstrip(os.sep) + os.sep
        report = BuildReport()
        seen: set[str] = set()
        chunk: list[str] = []

        def flush() -> None:
            indexed = {e.path: e for e in self.store.entries}
            changed = [indexed[p].row for p in chunk
                       if p in indexed and _file_stat(p) != (indexed[p].size, indexed[p].mtime_ns)]
            self.add(chunk, report=report, removed_rows=changed, **kwargs)
            chunk.clear()

        for path in iter_image_files(root):
            p = os.path.abspath(path)
            seen.add(p)
            chunk.append(p)
            if len(chunk) >= chunk_files:
                flush()
        flush()
        gone = [e.path for e in self.store.entries
                if (e.path.startswith(prefix) or e.path == root_abs) and e.path not in seen]
        report.removed = self.remove(gone)
        return report

    # -------------------------------------------------------------------------------- search
    def search(self, query: str, *, k: int = 10, rerank_k: int = 50, batch_size: int = 64) -> list[Hit]:
        """Top ``k`` images for one text query; the first ``rerank_k`` candidates are reranked."""
        return self.search_batch([query], k=k, rerank_k=rerank_k, batch_size=batch_size)[0]

    @torch.inference_mode()
    def search_batch(self, queries: Sequence[str], *, k: int = 10, rerank_k: int = 50,
                     batch_size: int = 64) -> list[list[Hit]]:
        """Like :meth:`search` for several queries; their pairs are scored in shared batches."""
        queries = [_check_query(q) for q in queries]
        n = len(self.store)
        if n == 0:
            raise ValueError("the index is empty: add images with `edje-search build-index`")
        if k <= 0 or rerank_k < 0:
            raise ValueError(f"k must be positive and rerank_k non-negative (got k={k}, rerank_k={rerank_k})")
        k = min(k, n)
        pool = min(max(k, rerank_k), n)
        clock = StageClock()
        q = self.model.embed_texts(list(queries)).cpu().numpy()
        clock.lap("text_embed")
        first_scores, rows = vector_index.search(self.store.faiss, q, pool)  # (Q, pool)
        clock.lap("faiss")
        n_rerank = min(rerank_k, pool)
        rerank = self._rerank_pool(queries, rows[:, :n_rerank], batch_size, clock) if n_rerank else None
        by_row = self.store.path_of_row
        fusion_weight = self.model.fusion_weight
        results = []
        for qi in range(len(queries)):
            cand = [(int(r), float(s)) for r, s in zip(rows[qi], first_scores[qi]) if r >= 0]
            head = cand[:n_rerank]
            tail = cand[n_rerank:]
            rs = [float(x) for x in rerank[qi][: len(head)]] if rerank is not None else []
            fused = [x + fusion_weight * s for x, (_, s) in zip(rs, head)]
            order = sorted(range(len(head)), key=lambda i: (-fused[i], -head[i][1]))
            ranked = [(*head[i], rs[i], fused[i]) for i in order] + [(r, s, None, None) for r, s in tail]
            results.append([Hit(rank=j + 1, row=r, path=by_row[r], first_stage_score=s, rerank_score=x, score=f)
                            for j, (r, s, x, f) in enumerate(ranked[:k])])
        clock.lap("merge")
        self.last_timings = {**clock.ms, "total": sum(clock.ms.values())}
        return results

    def _rerank_pool(self, queries: Sequence[str], rows: np.ndarray, batch_size: int,
                     clock: "StageClock | None" = None) -> np.ndarray:
        """Joint-encoder scores (Q, p) for each query against its candidate rows."""
        flat = rows.reshape(-1)
        valid = flat >= 0
        uniq, inverse = np.unique(flat[valid], return_inverse=True)
        tokens = torch.from_numpy(np.asarray(self.store.tokens.get(uniq), dtype=np.float32))
        if clock:
            clock.lap("gather")
        captions = np.repeat(np.arange(len(queries)), rows.shape[1])[valid]
        # length-bucketed batches: pairs sorted by caption length, so a batch pads to little
        lengths = np.array([len(ids) for ids in self.model.reranker.tokenizer(list(queries))["input_ids"]])
        order = np.argsort(lengths[captions], kind="stable")
        pair_scores = np.empty(len(order), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            sl = order[s:s + batch_size]
            caps = [queries[i] for i in captions[sl]]
            pair_scores[sl] = self.model.reranker.score(caps, projected_tokens=tokens[inverse[sl]]).cpu().numpy()
        scores = np.full(flat.shape, -np.inf, dtype=np.float32)
        scores[valid] = pair_scores
        if clock:
            clock.lap("rerank")
        return scores.reshape(rows.shape)

    def rerank_all(self, query: str, batch_size: int = 64) -> np.ndarray:
        """Joint-encoder score of ``query`` against every live row, by manifest order (oracle)."""
        rows = np.array([[e.row for e in self.store.entries]])
        with torch.inference_mode():
            return self._rerank_pool([query], rows, batch_size)[0]

    # ---------------------------------------------------------------------------------- info
    def info(self) -> dict:
        cfg = self.store.config
        return {
            "index": str(self.store.directory), "images": len(self.store), "rows": self.store.n_rows,
            "generation": self.store.generation, "factory": cfg.factory, "dim": cfg.dim,
            "tokens_per_image": cfg.tokens_per_image, "token_width": cfg.token_width,
            "token_dtype": cfg.token_dtype,
            "bytes_per_image": bytes_per_image(cfg.tokens_per_image, cfg.token_width, cfg.token_dtype),
            "model": cfg.model_path, "model_name": self.model.name, "model_fingerprint": cfg.model_fingerprint,
            "fusion_weight": self.model.fusion_weight,
        }

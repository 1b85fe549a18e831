"""The search engine: one object owning the index and the model.

Query flow: embed text -> FAISS top rerank_k -> gather stored tokens -> joint-encoder scores
-> hits sorted by rerank score.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .config import DEFAULT_RERANK_K
from .devices import pick_device, precision_autocast
from .errors import BadInput, BadQuery, IndexExists
from .indexer import BuildReport, Indexer
from .inspection import store_summary, verify_index
from .models.bundle import EdjeModel
from .models.registry import load_model
from .opening import create_index, open_index
from .pipeline import embed_pixels
from .ranking import rank_pool, score_rows
from .scoring import RowScorer
from .sorting import sort_hits, sort_key
from .storage import filtered_search
from .storage.index_store import IndexStore
from .storage.integrity import RepairReport
from .validation import MAX_ROW, check_min_prob, check_query

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result.

    ``rerank_score`` is the joint encoder's logit and ``score`` what the hit was ranked by:
    ``rerank_score + fusion_weight * first_stage_score`` (the model's fusion weight, 0 by
    default). ``prob`` is the match probability, the logit through the model's calibration
    (``sigmoid(logit)`` when it has none: ordered right, not a probability; calibration.py).
    All three are None for hits beyond the reranked pool, which keep first-stage order.
    ``rank`` is the position in relevance order (also when the hits are sorted by a field).
    """

    rank: int
    row: int
    path: str
    first_stage_score: float
    rerank_score: float | None
    score: float | None = None
    prob: float | None = None


def _ranked_hits(model: EdjeModel, by_row: dict[int, str], rows: np.ndarray, first_scores: np.ndarray,
                 n_rerank: int, logits: np.ndarray | None, k: int, min_prob: float | None) -> list[Hit]:
    """One query's hits: its first ``n_rerank`` candidates (first-stage order) ranked by the rule of
    ranking.py, each with its match probability, then the rest in first-stage order; with
    ``min_prob``, only the reranked hits whose probability reaches it."""
    cand = [(int(r), float(s)) for r, s in zip(rows, first_scores) if r >= 0]
    head, tail = cand[:n_rerank], cand[n_rerank:]
    rs = logits[: len(head)] if logits is not None else np.zeros(0, np.float32)
    order, fused = rank_pool(rs, np.array([s for _, s in head]), model.fusion_weight)
    probs = model.match_probability(rs)
    ranked = [(*head[i], float(rs[i]), float(fused[i]), float(probs[i])) for i in order]
    if min_prob is None:
        ranked += [(r, s, None, None, None) for r, s in tail]
    else:  # only reranked hits have a probability
        ranked = [h for h in ranked if h[4] >= min_prob]
    return [Hit(rank=j + 1, row=r, path=by_row[r], first_stage_score=s, rerank_score=x, score=f, prob=p)
            for j, (r, s, x, f, p) in enumerate(ranked[:k])]


class StageClock:
    """Wall-clock milliseconds per named stage, in order."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + 1000 * (now - self._last)
        self._last = now


class Engine:
    """Two-stage image search over one index directory."""

    def __init__(self, store: IndexStore, model: EdjeModel):
        self.store = store
        self.model = model
        self._indexer = Indexer(store, model)
        logger.info("index %s: %d images, generation %d, model %s on %s", store.directory, len(store),
                    store.generation, getattr(model, "name", None), getattr(model, "device", None))
        self.last_timings: dict[str, float] = {}  # milliseconds per stage of the latest search

    # -------------------------------------------------------------------------- construction
    @classmethod
    def create(cls, index_dir: str | Path, model: EdjeModel, *, factory: str = "auto",
               token_dtype: str = "float16", store_url: str = "", lock_wait: float = 0.0,
               device: str | torch.device | None = None) -> "Engine":
        """A new, empty index in ``index_dir`` for ``model``, created atomically; the model moves to
        ``device`` (default: CUDA when present), so the first build runs where later ones do.

        ``factory``: a FAISS factory string, or "auto" to choose the recipe by size as the index
        grows (Flat, then IVF, then OPQ+IVF-PQ; storage/vector_index.py). ``token_dtype`` float16,
        float32 or int8 (int8 with a scale per token halves the storage). ``store_url``: keep
        vectors and tokens at an fsspec URL (``s3://bucket/prefix``) instead of inside the index.
        Raises IndexExists (a FileExistsError) if an index is already there (see :meth:`create_or_open`).
        """
        target = pick_device(device)  # before anything is written: a device that is not there is an error
        store = create_index(index_dir, model, factory=factory, token_dtype=token_dtype, store_url=store_url,
                             lock_wait=lock_wait)
        model.to(target).eval()
        return cls(store, model)

    @classmethod
    def create_or_open(cls, index_dir: str | Path, model: EdjeModel | str | None = None, *,
                       device: str | torch.device | None = None, lock_wait: float = 0.0, **create_kwargs) -> "Engine":
        """Open the index in ``index_dir`` for writing, creating it for ``model`` if there is none.

        Two processes racing to create the same index end with one index: the loser opens the
        winner's (and fails with ModelMismatch if it was given a different model).
        """
        index_dir = Path(index_dir)
        if not (index_dir / "index.json").is_file():
            if model is None:
                raise BadInput(f"no index at {index_dir} yet: give a model to build it with (--model)")
            built = load_model(model) if isinstance(model, (str, Path)) else model
            try:
                return cls.create(index_dir, built, lock_wait=lock_wait, device=device, **create_kwargs)
            except IndexExists:
                model = built
        return cls.from_pretrained(index_dir, model=model, writable=True, device=device, lock_wait=lock_wait)

    @classmethod
    def from_pretrained(cls, index_dir: str | Path, *, model: EdjeModel | str | None = None,
                        writable: bool = False, device: str | torch.device | None = None,
                        backend: str = "eager", lock_wait: float = 0.0) -> "Engine":
        """Open an index; the model defaults to the one it was built with. ``backend`` picks how the
        reranker runs (eager, bf16, dynamic-int8, onnx, onnx-int8; see models/backends.py).
        ``writable`` engines take the writer lock for each write, waiting ``lock_wait`` seconds."""
        store, model = open_index(index_dir, model, writable=writable, lock_wait=lock_wait)
        model.to(pick_device(device)).eval()
        model.reranker.use_backend(backend)
        return cls(store, model)

    def refresh(self) -> bool:
        """Pick up commits made by another writer since this engine opened; True if it changed.

        A reader switches generations as a whole (segment lists, FAISS segments and row count come
        from one manifest transaction), so a search sees the old state or the new one."""
        return self.store.refresh()

    # ------------------------------------------------------------------------------- indexing
    @property
    def indexer(self) -> Indexer:
        """The writing half of the engine (indexer.py): what a custom build needs beyond the methods below."""
        return self._indexer

    def add(self, paths: Iterable[str | Path], *, batch_size: int = 32, num_workers: int = 2,
            commit_every: int = 512, progress: bool = True, report: BuildReport | None = None,
            removed_rows: Sequence[int] = (), optimize: bool = True, metadata: dict[str, dict] | None = None
            ) -> BuildReport:
        """Embed and commit image files (commits every ``commit_every`` images), under the writer lock.

        ``removed_rows`` are dropped in the first commit (how changed files are replaced
        without a commit of their own); their paths count as new. Paths that are not image
        files (by extension, images.is_image_path) are skipped with a reason. ``metadata``:
        absolute path -> user fields (photo_meta.read_sidecar), kept with the file metadata.
        """
        return self._indexer.add(paths, batch_size=batch_size, num_workers=num_workers, commit_every=commit_every,
                                 progress=progress, report=report, removed_rows=removed_rows, optimize=optimize,
                                 metadata=metadata)

    def sync(self, root: str | Path, *, chunk_files: int = 4096, batch_size: int = 32, num_workers: int = 2,
             commit_every: int = 512, progress: bool = True, metadata: dict[str, dict] | None = None) -> BuildReport:
        """Make the index mirror the images under ``root``: add new files, re-embed changed ones
        (size or modification time differ), drop deleted ones, fill in metadata unchanged files
        lack (``metadata`` as for :meth:`add`). Holds the writer lock throughout; the folder is
        walked as a stream, ``chunk_files`` paths at a time, deletions applied once it has ended.
        """
        return self._indexer.sync(root, chunk_files=chunk_files, batch_size=batch_size, num_workers=num_workers,
                                  commit_every=commit_every, progress=progress, metadata=metadata)

    def add_embeddings(self, paths: Sequence[str], vectors: np.ndarray, tokens: np.ndarray, *,
                       metadata: Sequence[dict | None] | None = None, hashes: Sequence[str | None] | None = None,
                       stats: Sequence[tuple[int, int]] | None = None, commit_every: int = 100_000,
                       optimize: bool = True) -> BuildReport:
        """Add rows computed elsewhere (a distributed build, your own embeddings), under the writer lock.

        ``vectors`` (N, E) float32, L2-normalised first-stage image embeddings; ``tokens`` (N, m, d)
        the adapter's outputs (what ``EdjeModel.embed_images`` returns); ``metadata`` one dict per
        row kept in the manifest (captions, source shard, ...); ``hashes`` the files' sha256 and
        ``stats`` their (size, mtime_ns) when the rows come from files, so later builds can tell
        unchanged, changed and duplicate files apart. Paths already indexed are left
        as they are and counted unchanged. Same checks and commit guarantees as :meth:`add`.
        """
        return self._indexer.add_embeddings(paths, vectors, tokens, metadata=metadata, hashes=hashes, stats=stats,
                                            commit_every=commit_every, optimize=optimize)

    def remove(self, paths: Iterable[str | Path], *, allow_all: bool = False) -> int:
        """Drop the rows of these files, or of every file under a folder given; returns how many.
        Empty or blank paths are refused, and so is emptying the whole index unless ``allow_all``."""
        return self._indexer.remove(paths, allow_all=allow_all)

    def optimize(self) -> dict:
        """Merge small FAISS segments and retrain the recipe as the index grows (writers call it after
        their commits; call it yourself after add_embeddings(..., optimize=False))."""
        with self.store.writing():
            return self.store.optimize()

    def repair(self) -> RepairReport:
        """Rebuild FAISS from the stored vectors, drop rows whose vectors or tokens are unreadable
        (listed in the report; build-index embeds them again), remove stray files."""
        with self.store.writing():
            return self.store.repair()

    def verify(self, *, deep: int = 0) -> list[str]:
        """Problems found (empty = healthy): everything :func:`inspection.verify_index` checks, and with
        ``deep`` > 0, that many indexed files re-embedded and compared with their stored rows."""
        problems = verify_index(self.store.directory)
        if deep and not problems:
            problems += self._indexer.check_sample(deep)
        return problems

    # -------------------------------------------------------------------------------- search
    def search(self, query: str, *, k: int = 10, rerank_k: int = DEFAULT_RERANK_K, batch_size: int = 64,
               where: str | None = None, under: str | None = None, min_prob: float | None = None,
               sort: str | None = None) -> list[Hit]:
        """Top ``k`` images for one text query, the first ``rerank_k`` candidates reranked, among the rows
        passing ``where`` (a metadata filter, docs/filters.md) and under folder ``under`` when given.
        ``min_prob``: only hits whose :attr:`Hit.prob` reaches it, possibly none (only reranked hits have
        one: at most ``rerank_k`` come back). ``sort``: list the hits relevance chose by a metadata
        field (``"taken"``, ``"-date"`` newest first; sorting.py)."""
        return self.search_batch([query], k=k, rerank_k=rerank_k, batch_size=batch_size, where=where, under=under,
                                 min_prob=min_prob, sort=sort)[0]

    @torch.inference_mode()
    def search_batch(self, queries: Sequence[str], *, k: int = 10, rerank_k: int = DEFAULT_RERANK_K,
                     batch_size: int = 64, where: str | None = None, under: str | None = None,
                     min_prob: float | None = None, sort: str | None = None) -> list[list[Hit]]:
        """Like :meth:`search` for several queries; their pairs are scored in shared batches."""
        queries = [check_query(q) for q in queries]
        if len(self.store) == 0:
            raise BadQuery("the index is empty: add images with `edje-search build-index`")
        if k <= 0 or rerank_k < 0:
            raise BadQuery(f"k must be positive and rerank_k non-negative (got k={k}, rerank_k={rerank_k})")
        check_min_prob(min_prob, rerank_k)
        key = sort_key(self.store, sort) if sort else None
        clock = StageClock()
        selected = None
        if where or under:
            selected = filtered_search.select_rows(self.store, where, under)
            clock.lap("filter")
        n = len(self.store) if selected is None else len(selected)
        if n == 0:  # nothing passes the filter
            return [[] for _ in queries]
        k, pool = min(k, n), min(max(k, rerank_k), n)
        n_rerank = min(rerank_k, pool)
        with precision_autocast(self.model.device):  # bf16/fp16 on CUDA, fp32 on the CPU
            q = self.model.embed_texts(list(queries)).float().cpu().numpy()
            clock.lap("text_embed")
            first_scores, rows = self.store.search(q, pool) if selected is None else \
                filtered_search.search_rows(self.store, q, pool, selected)  # (Q, pool)
            clock.lap("faiss")
            rerank = score_rows(self.model.reranker, self.store.tokens.read, queries, rows[:, :n_rerank],
                                batch_size, clock) if n_rerank else None
        by_row = self.store.paths(rows[rows >= 0].tolist())
        results = [_ranked_hits(self.model, by_row, rows[qi], first_scores[qi], n_rerank,
                                rerank[qi] if rerank is not None else None, k, min_prob) for qi in range(len(queries))]
        if key is not None:
            results = [sort_hits(self.store, hits, key) for hits in results]
        clock.lap("merge")
        self.last_timings = {**clock.ms, "total": sum(clock.ms.values())}
        return results

    def sort_hits(self, hits: Sequence[Hit], sort: str) -> list[Hit]:
        """``hits`` ordered by a metadata field as ``search(sort=...)`` orders them (sorting.py)."""
        return sort_hits(self.store, list(hits), sort_key(self.store, sort))

    def scorer(self, *, batch_size: int = 64, cosine: bool = True) -> RowScorer:
        """Joint scores of indexed rows from their stored tokens, over the open generation and the
        model: pairs (a scoring run), texts against rows, rows' data for classify (scoring.py)."""
        return RowScorer(self.store, self.model, batch_size=batch_size, cosine=cosine)

    def score(self, texts: Sequence[str], rows: Sequence[int], *, batch_size: int = 64) -> np.ndarray:
        """Joint-encoder logits (P,) of the pairs (``texts[i]``, indexed row ``rows[i]``)."""
        return self.scorer(batch_size=batch_size, cosine=False).score_texts(texts, rows)[0]

    # ------------------------------------------------------------------- rows and neighbours
    @property
    def generation(self) -> int:
        """The committed generation this engine searches (changes with :meth:`refresh`)."""
        return self.store.generation

    def paths(self, rows: Iterable[int]) -> dict[int, str]:
        """Row -> file path for those of ``rows`` that are live in this generation."""
        return self.store.paths(rows)

    def metadata(self, rows: Iterable[int]) -> dict[int, dict]:
        """Row -> {"path", and the metadata given at indexing (caption, ...)} for the live ``rows``."""
        return {r: {"path": e.path, **(e.meta or {})} for r, e in self.store.entries_of_rows(self.paths(rows)).items()}

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), E) stored first-stage embeddings of live ``rows`` (e.g. to compare results)."""
        return np.asarray(self.store.vectors(list(rows)), dtype=np.float32)

    def __len__(self) -> int:
        """Images searchable in the open generation."""
        return len(self.store)

    @property
    def directory(self) -> Path:
        """The index directory."""
        return self.store.directory

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A decoded RGB image -> (3, H, W) pixels as the model expects them (for :meth:`search_by_image`)."""
        return self.model.first_stage.preprocess(image)

    @property
    def image_input(self) -> tuple[int, str]:
        """(side, resize mode) of the model's image input: what an upload's decode guard checks against."""
        return int(self.model.first_stage.config.image_size), str(self.model.first_stage.config.resize_mode)

    @torch.inference_mode()
    def search_by_image(self, queries: Sequence[int | torch.Tensor], *, k: int = 10, where: str | None = None,
                        under: str | None = None) -> list[list[Hit] | None]:
        """First-stage neighbours of images: each query is an indexed row (its stored embedding;
        the row itself is left out of its hits) or preprocessed (3, H, W) pixels (:meth:`preprocess`).
        The first stage embeds images and texts into one space and FAISS holds the image
        embeddings, so an image query is a plain nearest-neighbour search there; nothing is
        reranked. ``where`` and ``under`` restrict the hits as in :meth:`search` (a query row
        need not pass them). A row that is not live gives None instead of a list of hits."""
        if k <= 0:
            raise BadQuery(f"k must be positive (got k={k})")
        clock = StageClock()
        selected = filtered_search.select_rows(self.store, where, under) if where or under else None
        if selected is not None:
            clock.lap("filter")
        vectors: list[np.ndarray | None] = [None] * len(queries)
        uploads = [i for i, q in enumerate(queries) if isinstance(q, torch.Tensor)]
        if uploads:
            embedded, _ = embed_pixels(self.model, torch.stack([queries[i] for i in uploads]))
            for i, v in zip(uploads, embedded):
                vectors[i] = v
        clock.lap("image_embed")
        own_row = [None if isinstance(q, torch.Tensor) else int(q) for q in queries]
        live = sorted(self.store.paths([r for r in own_row if r is not None and 0 <= r <= MAX_ROW]))
        stored = dict(zip(live, self.store.vectors(live))) if live else {}
        for i, row in enumerate(own_row):
            if row in stored:
                vectors[i] = stored[row]
        clock.lap("gather")
        results: list[list[Hit] | None] = [None] * len(queries)
        asked = [i for i, v in enumerate(vectors) if v is not None]
        n = len(self.store) if selected is None else len(selected)
        if asked and n:
            q = np.stack([vectors[i] for i in asked]).astype(np.float32)
            scores, rows = self.store.search(q, min(k + 1, n)) if selected is None else \
                filtered_search.search_rows(self.store, q, min(k + 1, n), selected)
            clock.lap("faiss")
            paths = self.store.paths(rows[rows >= 0].tolist())
            for qi, i in enumerate(asked):
                found = [(int(r), float(s)) for r, s in zip(rows[qi], scores[qi]) if r >= 0 and r != own_row[i]]
                results[i] = [Hit(rank=j + 1, row=r, path=paths[r], first_stage_score=s, rerank_score=None)
                              for j, (r, s) in enumerate(found[:k])]
        else:
            for i in asked:
                results[i] = []
        self.last_timings = {**clock.ms, "total": sum(clock.ms.values())}
        return results

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """First-stage neighbours of (Q, E) embeddings: (scores (Q, k), rows (Q, k)), rows -1 past the last image."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.store.config.dim:
            raise BadInput(f"vectors must have shape (Q, {self.store.config.dim}), got {vectors.shape}")
        return self.store.search(vectors, k)

    # ---------------------------------------------------------------------------------- info
    def info(self) -> dict:
        """What the open generation holds (inspection.store_summary) and the model serving it."""
        return {**store_summary(self.store), "model_name": self.model.name, "fusion_weight": self.model.fusion_weight}

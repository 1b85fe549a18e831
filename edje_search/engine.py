"""The search engine: one object owning the index and the model.

Query flow: embed text -> FAISS top rerank_k -> gather stored tokens -> joint-encoder scores
-> hits sorted by rerank score.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .config import IndexConfig
from .devices import inference_autocast, pick_device
from .errors import BadInput, BadQuery, IndexExists, ModelMismatch, ModelMissing
from .images import is_image_path, iter_image_files
from .models.bundle import EdjeModel
from .models.registry import load_model
from .pipeline import BackgroundCommits, ImageEmbedder, embed_files
from .ranking import rank_pool
from .storage.index_store import (IndexStore, RepairReport, record_model_path, resolve_model_path, verify_index,
                                  write_skipped)
from .storage.token_store import bytes_per_image, working_dtype

MAX_QUERY_CHARS = 2000
MODEL_SUBDIR = "model"  # where an index keeps a model that was built in memory


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
        raise BadQuery("empty query: give some text to search for")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadQuery("query is not valid UTF-8 text") from e
    if len(text) > MAX_QUERY_CHARS:
        raise BadQuery(f"query too long ({len(text)} characters; the limit is {MAX_QUERY_CHARS})")
    return text


class Engine:
    """Two-stage image search over one index directory."""

    def __init__(self, store: IndexStore, model: EdjeModel):
        self.store = store
        self.model = model
        self._store_lock = threading.RLock()  # commits run on a writer thread while embedding goes on
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
        index_dir = Path(index_dir)
        target = pick_device(device)  # before anything is written: a device that is not there is an error
        inside = model.path is None  # a model built in memory is kept inside the index
        config = IndexConfig(
            factory=factory, dim=model.first_stage.embed_dim,
            tokens_per_image=model.reranker.config.tokens_per_image,
            token_width=model.reranker.token_width, token_dtype=token_dtype,
            model_path=MODEL_SUBDIR if inside else str(model.path), model_fingerprint="", store_url=store_url,
        )

        def populate(tmp: Path) -> IndexConfig:
            # a model built in memory is saved inside the new index, which gives its fingerprint
            model.save_pretrained(tmp / MODEL_SUBDIR)
            return dataclasses.replace(config, model_fingerprint=model.fingerprint())

        if inside:
            store = IndexStore.create(index_dir, config, populate=populate)
            model.path = (index_dir / MODEL_SUBDIR).resolve()
        else:
            store = IndexStore.create(index_dir, dataclasses.replace(config, model_fingerprint=model.fingerprint()))
        store.lock.wait = lock_wait
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
        store = IndexStore.open(index_dir, mode="r+" if writable else "r", lock_wait=lock_wait)
        if model is None:
            model_path = resolve_model_path(store)
            if not model_path.is_dir():
                raise ModelMissing(f"the model this index was built with is gone: {model_path} "
                                   f"(pass --model with that model)")
            model = load_model(model_path)
        elif isinstance(model, (str, Path)):
            model = load_model(model)
        if model.path is None:
            raise BadInput(f"an index already exists in {index_dir}: open it with the model directory it was built "
                           f"with (or model=None), not a model built in memory")
        if model.fingerprint() != store.config.model_fingerprint:
            raise ModelMismatch(
                f"index {index_dir} was built with model {store.config.model_fingerprint} "
                f"({store.config.model_path}) but the model given is {model.fingerprint()} ({model.path}); "
                f"use that model or rebuild the index")
        if writable and not resolve_model_path(store).is_dir() and model.path is not None:
            with store.writing():  # the model moved: remember where it is now
                record_model_path(store, model.path)
        model.to(pick_device(device)).eval()
        model.reranker.use_backend(backend)
        return cls(store, model)

    def refresh(self) -> bool:
        """Pick up commits made by another writer since this engine opened; True if it changed.

        A reader switches generations as a whole (segment lists, FAISS segments and row count
        come from one manifest transaction), so a search sees the old state or the new one.
        """
        return self.store.refresh()

    # ------------------------------------------------------------------------------- indexing
    def add(self, paths: Iterable[str | Path], *, batch_size: int = 32, num_workers: int = 2,
            commit_every: int = 512, progress: bool = True, report: BuildReport | None = None,
            removed_rows: Sequence[int] = (), optimize: bool = True) -> BuildReport:
        """Embed and commit image files (commits every ``commit_every`` images), under the writer lock.

        ``removed_rows`` are dropped in the first commit (how changed files are replaced
        without a commit of their own); their paths count as new. Paths that are not image
        files (by extension, images.is_image_path) are skipped with a reason.
        """
        report = report or BuildReport()
        with self.store.writing(), self._indexer(batch_size, num_workers) as embedder:
            self._add_paths(paths, report, removed_rows, embedder, commit_every=commit_every, progress=progress)
            if optimize:
                self.store.optimize()
            write_skipped(self.store.directory, report.skipped)
        return report

    def _indexer(self, batch_size: int, num_workers: int) -> ImageEmbedder:
        """Decode workers + model for a whole build (one long-lived DataLoader, not one per chunk)."""
        return ImageEmbedder(self.model, batch_size=batch_size, num_workers=num_workers,
                             token_dtype=working_dtype(self.store.config.token_dtype),
                             known_hashes=self.store.hash_lookup())

    def _add_paths(self, paths: Iterable[str | Path], report: BuildReport, removed_rows: Sequence[int],
                   embedder: ImageEmbedder, *, commit_every: int, progress: bool) -> None:
        todo = []
        for p in paths:
            p = os.path.abspath(p)
            if not is_image_path(p):
                report.skipped.append((p, "not an image file extension"))
            else:
                todo.append(p)
        dropped = set(int(r) for r in removed_rows)
        known = {path for path, e in self.store.lookup_paths(todo).items() if e.row not in dropped}
        report.unchanged += sum(1 for p in todo if p in known)
        todo = list(dict.fromkeys(p for p in todo if p not in known))
        missed = self._embed_and_commit(embedder, todo, report, list(removed_rows),
                                        commit_every=commit_every, progress=progress)
        if missed:  # duplicates of rows removed meanwhile: embed them after all
            with ImageEmbedder(self.model, batch_size=embedder.batch_size, num_workers=0,
                               token_dtype=embedder.token_dtype) as again:
                self._embed_and_commit(again, missed, report, [], commit_every=commit_every, progress=False)

    def _embed_and_commit(self, embedder: ImageEmbedder, todo: list[str], report: BuildReport,
                          to_remove: list[int], *, commit_every: int, progress: bool) -> list[str]:
        """Embed ``todo`` and commit every ``commit_every`` rows on a writer thread, so the model
        never waits on the disk. Returns the paths reported as duplicates of content that is no
        longer indexed (the caller embeds them)."""
        pending: list = []
        n_pending = 0
        missed: list[str] = []
        with BackgroundCommits() as committer:
            for batch in embedder.embed(todo, progress=progress):
                report.skipped.extend(batch.failed)
                if batch.duplicates:  # same content as an indexed file: copy its rows, no model pass
                    with self._store_lock:
                        missed += self._copy_duplicates(batch, report)
                if batch.paths:
                    pending.append(batch)
                    n_pending += len(batch.paths)
                if n_pending >= commit_every:
                    committer.submit(self._commit, pending, to_remove, report)
                    pending, n_pending, to_remove = [], 0, []
            committer.submit(self._commit, pending, to_remove, report)
        return missed

    def _copy_duplicates(self, batch, report: BuildReport) -> list[str]:
        rows = [self.store.row_of_hash(h) for _, h, _ in batch.duplicates]
        dup = [(d, r) for d, r in zip(batch.duplicates, rows) if r is not None]
        report.duplicates += len(dup)
        if dup:
            rows = [r for _, r in dup]
            batch.paths += [p for (p, _, _), _ in dup]
            batch.hashes += [h for (_, h, _), _ in dup]
            batch.stats += [st for (_, _, st), _ in dup]
            batch.vectors = np.concatenate([batch.vectors, self.store.vectors(rows)])
            batch.tokens = np.concatenate([batch.tokens, self.store.tokens.get(rows).astype(batch.tokens.dtype)])
        return [p for (p, _, _), r in zip(batch.duplicates, rows) if r is None]

    def _commit(self, batches: list, removed_rows: Sequence[int] = (), report: BuildReport | None = None) -> int:
        if not batches and not removed_rows:
            return 0
        cfg = self.store.config
        paths = [p for b in batches for p in b.paths]
        vectors = np.concatenate([b.vectors for b in batches]) if batches else np.zeros((0, cfg.dim), np.float32)
        tokens = np.concatenate([b.tokens for b in batches]) if batches else np.zeros(
            (0, cfg.tokens_per_image, cfg.token_width), np.float16)
        with self._store_lock:  # the embedding thread reads the store for duplicates meanwhile
            self.store.commit(paths, [h for b in batches for h in b.hashes], vectors, tokens,
                              removed_rows=removed_rows, new_stats=[st for b in batches for st in b.stats])
        if report is not None:
            report.added += len(paths)
        return len(paths)

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
        cfg = self.store.config
        paths = [os.fsdecode(p) for p in paths]
        vectors = np.asarray(vectors)
        tokens = np.asarray(tokens)
        n = len(paths)
        if vectors.shape != (n, cfg.dim):
            raise BadInput(f"vectors must have shape ({n}, {cfg.dim}), got {vectors.shape}")
        if tokens.shape != (n, cfg.tokens_per_image, cfg.token_width):
            raise BadInput(f"tokens must have shape ({n}, {cfg.tokens_per_image}, {cfg.token_width}), "
                           f"got {tokens.shape}")
        for name, arr in (("vectors", vectors), ("tokens", tokens)):
            if not np.issubdtype(arr.dtype, np.floating):
                raise BadInput(f"{name} must be floating point, got {arr.dtype}")
            if not np.all(np.isfinite(arr)):
                raise BadInput(f"{name} contain NaN or infinite values")
        if len(set(paths)) != n:
            raise BadInput("paths repeat within one add_embeddings call")
        for given, what in ((metadata, "metadata"), (hashes, "hashes"), (stats, "stats")):
            if given is not None and len(given) != n:
                raise BadInput(f"{what} has {len(given)} entries for {n} paths")
        report = BuildReport()
        with self.store.writing():
            known = self.store.lookup_paths(paths)
            keep = np.array([p not in known for p in paths], dtype=bool)
            report.unchanged = int((~keep).sum())
            idx = np.nonzero(keep)[0]
            for s in range(0, len(idx), commit_every):
                part = idx[s:s + commit_every]
                self.store.commit([paths[i] for i in part], [hashes[i] if hashes else None for i in part],
                                  vectors[part].astype(np.float32), tokens[part],
                                  new_stats=[stats[i] for i in part] if stats is not None else None,
                                  new_meta=[metadata[i] for i in part] if metadata is not None else None)
                report.added += len(part)
            if optimize:
                self.store.optimize()
        return report

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Drop the rows of these files, or of every file under a folder given; returns how many."""
        with self.store.writing():
            rows: list[int] = []
            wanted = [os.path.abspath(p) for p in paths]
            rows += [e.row for e in self.store.lookup_paths(wanted).values()]
            for p in wanted:  # a folder, even one already deleted from disk: everything under it
                rows += [e.row for e in self.store.live_under(p.rstrip(os.sep) + os.sep)]
            rows = sorted(set(rows))
            if rows:
                self.store.commit([], [], np.zeros((0, self.store.config.dim), np.float32),
                                  np.zeros((0, self.store.config.tokens_per_image, self.store.config.token_width)),
                                  removed_rows=rows)
                self.store.optimize()
        return len(rows)

    def sync(self, root: str | Path, *, chunk_files: int = 4096, batch_size: int = 32, num_workers: int = 2,
             commit_every: int = 512, progress: bool = True) -> BuildReport:
        """Make the index mirror the images under ``root``: add new files, re-embed changed ones
        (size or modification time differ), drop deleted ones. Holds the writer lock throughout.

        The folder is walked as a stream and processed ``chunk_files`` paths at a time, so work
        starts at once on very large folders; deletions are applied once the walk has ended.
        """
        root_abs = os.path.abspath(root)
        prefix = root_abs.rstrip(os.sep) + os.sep
        report = BuildReport()
        seen: set[str] = set()
        chunk: list[str] = []
        with self.store.writing(), self._indexer(batch_size, num_workers) as embedder:
            def flush() -> None:
                indexed = self.store.lookup_paths(chunk)
                changed = [indexed[p].row for p in chunk
                           if p in indexed and _file_stat(p) != (indexed[p].size, indexed[p].mtime_ns)]
                self._add_paths(chunk, report, changed, embedder, commit_every=commit_every, progress=progress)
                chunk.clear()

            for path in iter_image_files(root):
                p = os.path.abspath(path)
                seen.add(p)
                chunk.append(p)
                if len(chunk) >= chunk_files:
                    flush()
            flush()
            gone = [e.row for e in self.store.live_under(prefix) if e.path not in seen]
            if os.path.isfile(root_abs) or not os.path.exists(root_abs):
                gone += [e.row for path, e in self.store.lookup_paths([root_abs]).items() if path not in seen]
            if gone:
                self.store.commit([], [], np.zeros((0, self.store.config.dim), np.float32),
                                  np.zeros((0, self.store.config.tokens_per_image, self.store.config.token_width)),
                                  removed_rows=gone)
            report.removed = len(gone)
            self.store.optimize()
            write_skipped(self.store.directory, report.skipped)
        return report

    def optimize(self) -> dict:
        """Merge small FAISS segments and retrain the recipe as the index grows (writers call it after
        their commits; call it yourself after add_embeddings(..., optimize=False))."""
        with self.store.writing():
            return self.store.optimize()

    def repair(self) -> "RepairReport":
        """Rebuild FAISS from the stored vectors, drop rows whose vectors or tokens are unreadable
        (listed in the report; build-index embeds them again), remove stray files."""
        with self.store.writing():
            return self.store.repair()

    def verify(self, *, deep: int = 0) -> list[str]:
        """Problems found (empty = healthy): everything :func:`verify_index` checks, and with
        ``deep`` > 0, that many indexed files re-embedded and compared with their stored rows."""
        problems = verify_index(self.store.directory)
        if deep and not problems:
            problems += self._verify_sample(deep)
        return problems

    def _verify_sample(self, n: int) -> list[str]:
        rng = np.random.default_rng(0)
        entries = [e for e in self.store.iter_entries() if os.path.isfile(e.path)]
        if not entries:
            return []
        pick = [entries[i] for i in sorted(rng.choice(len(entries), min(n, len(entries)), replace=False))]
        problems = []
        dtype = working_dtype(self.store.config.token_dtype)
        for batch in embed_files(self.model, [e.path for e in pick], batch_size=16, num_workers=0,
                                 token_dtype=dtype, progress=False):
            by_path = {e.path: e for e in pick}
            rows = [by_path[p].row for p in batch.paths]
            if not rows:
                continue
            stored_v = self.store.vectors(rows)
            stored_t = self.store.tokens.get(rows).astype(np.float32)
            for i, p in enumerate(batch.paths):
                if not np.allclose(stored_v[i], batch.vectors[i], atol=1e-3):
                    problems.append(f"re-embedding {p} gives a different vector than row {rows[i]} holds")
                elif not np.allclose(stored_t[i], batch.tokens[i].astype(np.float32), atol=5e-2, rtol=2e-2):
                    problems.append(f"re-embedding {p} gives different tokens than row {rows[i]} holds")
        return problems

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
            raise BadQuery("the index is empty: add images with `edje-search build-index`")
        if k <= 0 or rerank_k < 0:
            raise BadQuery(f"k must be positive and rerank_k non-negative (got k={k}, rerank_k={rerank_k})")
        k = min(k, n)
        pool = min(max(k, rerank_k), n)
        clock = StageClock()
        with inference_autocast(self.model.device):  # bf16/fp16 on CUDA, fp32 on the CPU
            q = self.model.embed_texts(list(queries)).float().cpu().numpy()
        clock.lap("text_embed")
        first_scores, rows = self.store.search(q, pool)  # (Q, pool)
        clock.lap("faiss")
        n_rerank = min(rerank_k, pool)
        with inference_autocast(self.model.device):
            rerank = self._rerank_pool(queries, rows[:, :n_rerank], batch_size, clock) if n_rerank else None
        by_row = self.store.paths(rows[rows >= 0].tolist())
        fusion_weight = self.model.fusion_weight
        results = []
        for qi in range(len(queries)):
            cand = [(int(r), float(s)) for r, s in zip(rows[qi], first_scores[qi]) if r >= 0]
            head = cand[:n_rerank]
            tail = cand[n_rerank:]
            rs = rerank[qi][: len(head)] if rerank is not None else np.zeros(0, np.float32)
            order, fused = rank_pool(rs, np.array([s for _, s in head]), fusion_weight)
            ranked = [(*head[i], float(rs[i]), float(fused[i])) for i in order] + [(r, s, None, None) for r, s in tail]
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
        scores = np.full(flat.shape, -np.inf, dtype=np.float32)
        scores[valid] = self.model.reranker.score_pairs(queries, tokens, captions, inverse, batch_size=batch_size)
        if clock:
            clock.lap("rerank")
        return scores.reshape(rows.shape)

    def score(self, texts: Sequence[str], rows: Sequence[int], *, batch_size: int = 64) -> np.ndarray:
        """Joint-encoder logits (P,) of the pairs (``texts[i]``, indexed row ``rows[i]``), from the
        stored tokens; scoring.score_rows also gives the first-stage cosines."""
        from .scoring import score_rows

        return score_rows(self, texts, rows, batch_size=batch_size)[0]

    def rerank_all(self, query: str, batch_size: int = 64) -> np.ndarray:
        """Joint-encoder score of ``query`` against every live row, by manifest order (oracle)."""
        rows = np.array([[e.row for e in self.store.iter_entries()]])
        with torch.inference_mode():
            return self._rerank_pool([query], rows, batch_size)[0]

    # ------------------------------------------------------------------- rows and neighbours
    @property
    def generation(self) -> int:
        """The committed generation this engine searches (changes with :meth:`refresh`)."""
        return self.store.generation

    def paths(self, rows: Iterable[int]) -> dict[int, str]:
        """Row -> file path for those of ``rows`` that are live in this generation."""
        return self.store.paths(rows)

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """First-stage nearest neighbours of (Q, E) embeddings, e.g. of images for image-to-image
        search: (scores (Q, k), rows (Q, k)), rows -1 where fewer than k images exist."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.store.config.dim:
            raise BadInput(f"vectors must have shape (Q, {self.store.config.dim}), got {vectors.shape}")
        return self.store.search(vectors, k)

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

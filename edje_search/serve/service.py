"""What the engine thread does for the server: batched text and image searches, and keeping
the index at the latest committed generation."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Hashable

import torch

from ..engine import Engine, Hit

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextJob:
    queries: list[str]
    k: int


@dataclasses.dataclass(frozen=True)
class ImageJob:
    k: int
    pixels: torch.Tensor | None = None  # (3, H, W) preprocessed upload
    row: int | None = None  # or an indexed row


class RowGone(LookupError):
    """The row asked for is not in the index (any more)."""


def text_key(rerank_k: int, where: str | None = None, min_prob: float | None = None,
             sort: str | None = None) -> Hashable:
    """Text searches share an engine call when their rerank_k, filter, cutoff and sort agree (k
    only trims the results); a filter or sort field that is refused fails only the requests that
    sent it."""
    return ("text", rerank_k, where or None, min_prob, sort or None)


def image_key(where: str | None = None) -> Hashable:
    """Image searches share an engine call when their filters agree."""
    return ("image", where or None)


IMAGE_KEY: Hashable = image_key()


def _hit_dict(hit: Hit, first_stage_rank: int, rank: int) -> dict:
    return {"rank": rank, "first_stage_rank": first_stage_rank, "row": hit.row, "path": hit.path,
            "first_stage_score": hit.first_stage_score, "rerank_score": hit.rerank_score, "score": hit.score,
            "prob": hit.prob}


def both_orders(pool: list[Hit], k: int, top: list[Hit] | None = None) -> dict:
    """The reranked top k and the first-stage top k of one query's candidate pool, each hit
    carrying its position in both orders (how far reranking moved it). ``top``: the top k as
    they are to be listed, when not in relevance order (sorted by a field)."""
    by_first = sorted(pool, key=lambda h: (-h.first_stage_score, h.row))
    first_rank = {h.row: i + 1 for i, h in enumerate(by_first)}
    return {"hits": [_hit_dict(h, first_rank[h.row], h.rank) for h in (pool[:k] if top is None else top)],
            "first_stage": [_hit_dict(h, first_rank[h.row], h.rank) for h in by_first[:k]]}


class SearchService:
    """Runs batches for :class:`~edje_search.serve.batching.MicroBatcher`, in its one engine thread."""

    def __init__(self, engine: Engine, refresh_interval_s: float = 1.0):
        self.engine = engine
        self.refresh_interval_s = refresh_interval_s
        self._last_refresh = time.monotonic()

    def maybe_refresh(self) -> None:
        """Open a newer committed generation if one exists (checked at most every refresh_interval_s)."""
        now = time.monotonic()
        if now - self._last_refresh < self.refresh_interval_s:
            return
        self._last_refresh = now
        if self.engine.refresh():
            logger.info("index refreshed: generation %d, %d images", self.engine.generation, len(self.engine))

    def run(self, key: Hashable, jobs: list) -> list:
        if key[0] == "image":
            return self._image_batch(jobs, where=key[1])
        return self._text_batch(key[1], jobs, where=key[2], min_prob=key[3], sort=key[4])

    def _text_batch(self, rerank_k: int, jobs: list[TextJob], where: str | None = None,
                    min_prob: float | None = None, sort: str | None = None) -> list[tuple[list[dict], dict]]:
        queries = [q for job in jobs for q in job.queries]
        if len(self.engine) == 0:
            return [([{"query": q, "hits": [], "first_stage": []} for q in job.queries], {}) for job in jobs]
        if sort:
            self.engine.sort_hits([], sort)  # an unknown field fails these requests before any search
        # the whole candidate pool comes back, so both orders can be shown; a sort orders each top k
        pool_k = max(rerank_k, max(job.k for job in jobs))
        pools = self.engine.search_batch(queries, k=pool_k, rerank_k=rerank_k, where=where, min_prob=min_prob)
        stages = dict(self.engine.last_timings)
        out, i = [], 0
        for job in jobs:
            results = []
            for q in job.queries:
                top = self.engine.sort_hits(pools[i][:job.k], sort) if sort else None
                results.append({"query": q, **both_orders(pools[i], job.k, top)})
                i += 1
            out.append((results, stages))
        return out

    def _image_batch(self, jobs: list[ImageJob], where: str | None = None) -> list:
        queries = [job.pixels if job.pixels is not None else job.row for job in jobs]
        found = self.engine.search_by_image(queries, k=max(job.k for job in jobs), where=where)
        stages = dict(self.engine.last_timings)
        results: list = []
        for job, hits in zip(jobs, found):
            if hits is None:
                results.append(RowGone(f"row {job.row} is not in the index"))
            else:
                results.append([{"rank": h.rank, "row": h.row, "path": h.path, "first_stage_score": h.first_stage_score}
                                for h in hits[:job.k]])
        return [(r, stages) for r in results]

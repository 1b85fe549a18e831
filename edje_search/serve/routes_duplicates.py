"""``GET /duplicates``: groups of exact copies and near-duplicates of the served index
(storage/duplicates.py), computed on the first request and kept for that generation."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from ..storage.duplicates import DEFAULT_THRESHOLD, find_duplicates
from ..storage.index_store import IndexStore
from .context import ServeContext, url_prefix, with_urls


def duplicates_router(ctx: ServeContext) -> APIRouter:
    router = APIRouter(tags=["images"])
    engine = ctx.engine
    cache: dict[tuple[int, float], dict] = {}

    def find_groups(threshold: float) -> dict:  # in the thread pool: a range search over the whole index
        key = (engine.generation, threshold)
        if key not in cache:
            found = find_duplicates(IndexStore.open(engine.directory), threshold)
            cache.clear()  # one answer kept: the latest generation's, for the latest threshold
            cache[key] = {kind: [dataclasses.asdict(g) for g in groups] for kind, groups in found.items()}
        return cache[key]

    @router.get("/duplicates")
    async def duplicates(request: Request, threshold: float = Query(
            DEFAULT_THRESHOLD, ge=-1.0, le=1.0, description="first-stage cosine similarity at or above which two "
                                                             "images are near-duplicates")):
        """Groups of exact copies (same content hash) and near-duplicates (first-stage vectors within the
        threshold; docs/filters.md). Computed over the whole index on first request, then kept per generation."""
        found = await run_in_threadpool(find_groups, threshold)
        p = url_prefix(request)

        def group(g: dict) -> dict:
            images = [with_urls({"row": r, "path": path}, p) for r, path in zip(g["rows"], g["paths"])]
            return {"kind": g["kind"], "similarity": g["similarity"], "images": images}

        return {"threshold": threshold, "generation": engine.generation,
                **{kind: [group(g) for g in groups] for kind, groups in found.items()}}

    return router

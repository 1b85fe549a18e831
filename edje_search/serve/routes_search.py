"""Search routes: text queries (one or a batch) and image-to-image search, all through the
micro-batcher, so concurrent requests share engine calls."""
from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..config import DEFAULT_RERANK_K
from ..validation import MAX_ROW, check_min_prob
from . import schemas
from .context import ServeContext, documented, timings, url_prefix, with_urls
from .service import ImageJob, RowGone, TextJob, image_key, text_key


def search_router(ctx: ServeContext) -> APIRouter:
    router = APIRouter(tags=["search"])
    engine, limits, batcher = ctx.engine, ctx.limits, ctx.batcher

    @router.get("/search", response_model=None, responses=documented(schemas.SearchResponse))
    async def search(request: Request, q: str = Query(..., description="the text to search for"),
                     k: int = Query(10, description="results to return"),
                     rerank_k: int = Query(DEFAULT_RERANK_K,
                                           description="first-stage candidates reranked by the joint encoder"),
                     where: Optional[str] = Query(None, description=schemas.WHERE_HELP),
                     min_prob: Optional[float] = Query(None, description=schemas.MIN_PROB_HELP),
                     sort: Optional[str] = Query(None, description=schemas.SORT_HELP)):
        """Top k images for one text query, in the reranked order and the first stage's order."""
        limits.check_query(q)
        limits.check_k(k)
        limits.check_rerank_k(rerank_k)
        check_min_prob(min_prob, rerank_k)
        (results, stages), info = await batcher.submit(text_key(rerank_k, where, min_prob, sort), TextJob([q], k),
                                                       weight=1)
        p = url_prefix(request)
        result = results[0]
        return JSONResponse({"query": q, "k": k, "rerank_k": rerank_k, "min_prob": min_prob, "sort": sort,
                             "generation": engine.generation,
                             "hits": [with_urls(h, p) for h in result["hits"]],
                             "first_stage": [with_urls(h, p) for h in result["first_stage"]],
                             "timings": timings(stages, info)})

    @router.post("/search", response_model=None, responses=documented(schemas.BatchResponse))
    async def search_many(request: Request, body: schemas.BatchRequest):
        """Several text queries in one request; they are scored in one engine call."""
        queries = limits.check_queries(body.queries)
        limits.check_k(body.k)
        limits.check_rerank_k(body.rerank_k)
        check_min_prob(body.min_prob, body.rerank_k)
        (results, stages), info = await batcher.submit(text_key(body.rerank_k, body.where, body.min_prob, body.sort),
                                                       TextJob(queries, body.k), weight=len(queries))
        p = url_prefix(request)
        return JSONResponse({
            "k": body.k, "rerank_k": body.rerank_k, "min_prob": body.min_prob, "sort": body.sort,
            "generation": engine.generation,
            "results": [{"query": r["query"], "hits": [with_urls(h, p) for h in r["hits"]],
                         "first_stage": [with_urls(h, p) for h in r["first_stage"]]} for r in results],
            "timings": timings(stages, info)})

    @router.post("/search/image", response_model=None, responses=documented(schemas.ImageSearchResponse))
    async def search_image(request: Request,
                           file: Annotated[Optional[UploadFile], File(description="an image to search with")] = None,
                           row: Annotated[Optional[int], Form(ge=0, le=MAX_ROW,
                                                              description="or an indexed row to search from")] = None,
                           k: Annotated[int, Form()] = 10,
                           where: Annotated[Optional[str], Form(description=schemas.WHERE_HELP)] = None):
        """Nearest images by first-stage image embedding, to an uploaded image or an indexed one."""
        limits.check_k(k)
        if (file is None) == (row is None):
            raise HTTPException(400, "give exactly one of 'file' (an upload) or 'row' (an indexed image)")
        if row is not None:
            if row not in engine.paths([row]):
                raise RowGone(f"row {row} is not in the index")
            job = ImageJob(k=k, row=row)
        else:
            data = await file.read()
            try:
                pixels = await ctx.in_decode_slot(ctx.decode_upload, data)
            except ValueError as e:
                raise HTTPException(400, f"not a usable image: {e}") from None
            job = ImageJob(k=k, pixels=pixels)
        (result, stages), info = await batcher.submit(image_key(where), job)
        if isinstance(result, Exception):
            raise result
        p = url_prefix(request)
        return JSONResponse({"query_row": row, "k": k, "generation": engine.generation,
                             "hits": [with_urls(h, p) for h in result], "timings": timings(stages, info)})

    return router

"""The FastAPI application: JSON API, OpenAPI docs, the gallery and its assets.

Built around an open :class:`~edje_search.engine.Engine` by :func:`create_app`; every engine
call goes through one :class:`~edje_search.serve.batching.MicroBatcher` and its one thread.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..config import DEFAULT_RERANK_K
from ..engine import Engine
from ..errors import BadInput, BadQuery, EdjeError, IndexCorrupt
from ..images import decode_image
from . import schemas
from .batching import BatchInfo, BatchSettings, MicroBatcher, Overloaded
from .files import FileRefused, ThumbnailCache, read_indexed_file
from .limits import ServeLimits
from .security import BodyLimit, InFlightLimit, RequestCounter, TokenAuth
from .service import IMAGE_KEY, ImageJob, RowGone, SearchService, TextJob, text_key

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
ERRORS = {400: {"model": schemas.ErrorOut}, 401: {"model": schemas.ErrorOut}, 413: {"model": schemas.ErrorOut},
          503: {"model": schemas.ErrorOut}}


def _documented(model) -> dict:
    """OpenAPI responses for a route that returns a ready JSONResponse: the body is built as
    plain dicts and not validated again per request (tests check it against ``model``)."""
    return {200: {"model": model}, **ERRORS}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-py package, served locally (no CDN)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def _timings(stages: dict, info: BatchInfo) -> dict:
    return {"stages_ms": stages, "queue_ms": round(info.queue_ms, 3), "batch_queries": info.queries,
            "batch_requests": info.jobs}


def _with_urls(hit: dict, prefix: str) -> dict:
    """URLs of the hit's image, and ``missing`` when its file is gone from disk (the index still
    names it until the next build drops it)."""
    return {**hit, "image_url": f"{prefix}/images/{hit['row']}", "thumbnail_url": f"{prefix}/thumbnails/{hit['row']}",
            "missing": not os.path.exists(hit["path"])}


def _row_number(row: str) -> int:
    """A row from the URL: decimal digits only (anything else, traversal attempts included, is 404)."""
    if not row.isascii() or not row.isdigit() or len(row) > 12:
        raise HTTPException(404, f"no indexed image {row!r}: images are addressed by row number")
    return int(row)


def create_app(engine: Engine, *, limits: ServeLimits | None = None, batching: BatchSettings | None = None,
               token: str | None = None, refresh_interval_s: float = 1.0, thumbnail_size: int = 256,
               max_in_flight: int | None = None) -> FastAPI:
    """The ASGI app serving ``engine``. ``token`` (when given) is required on every request;
    ``limits`` and ``batching`` default to :class:`ServeLimits` and :class:`BatchSettings`;
    ``max_in_flight`` requests at once (default: max_queue + max_batch), more get 503."""
    limits = limits or ServeLimits()
    batching = batching or BatchSettings()
    service = SearchService(engine, refresh_interval_s=refresh_interval_s)
    in_progress = RequestCounter()
    batcher = MicroBatcher(service.run, batching, before_batch=service.maybe_refresh,
                           coming=lambda: in_progress.value - batcher.queued_jobs - batcher.running_jobs)
    thumbnails = ThumbnailCache(size=thumbnail_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="edje-search", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Two-stage text-to-image search: first-stage embeddings recall, a joint encoder "
                              "reranks (EDJE). Limits: " + ", ".join(f"{k}={v}" for k, v in
                                                                   vars(limits).items()))
    app.state.batcher = batcher
    app.state.service = service
    app.state.thumbnails = thumbnails
    app.add_middleware(BodyLimit, limit_for=lambda path: limits.max_upload_bytes if path == "/search/image"
                       else limits.max_json_bytes)
    # every admitted search can be in the engine's queue or batch; more than that is refused at once
    app.add_middleware(InFlightLimit, limit=max_in_flight or batching.max_queue + batching.max_batch,
                       counter=in_progress)
    if token is not None:
        app.add_middleware(TokenAuth, token=token)  # added last = outermost: checked before anything else

    # ------------------------------------------------------------------------------ errors
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RowGone)
    async def row_gone(request: Request, exc: RowGone):
        return _error(404, str(exc))

    @app.exception_handler(FileRefused)
    async def file_refused(request: Request, exc: FileRefused):
        return _error(exc.status, str(exc))

    @app.exception_handler(IndexCorrupt)
    async def index_unavailable(request: Request, exc: IndexCorrupt):
        logger.error("index unavailable: %s", exc)
        return _error(503, f"index unavailable: {exc}")

    async def bad_value(request: Request, exc: ValueError):
        return _error(400, str(exc) or "bad request")

    # BadQuery and BadInput are EdjeErrors too: registered by name, as the handler lookup follows the MRO
    for cls in (BadQuery, BadInput, ValueError):  # ValueError: the engine's own argument checks
        app.add_exception_handler(cls, bad_value)

    @app.exception_handler(EdjeError)
    async def edje_error(request: Request, exc: EdjeError):
        logger.error("request failed: %s", exc)
        return _error(500, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error(500, "internal error (details are in the server log)")

    # ------------------------------------------------------------------------------ search
    def prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/search", response_model=None, responses=_documented(schemas.SearchResponse), tags=["search"])
    async def search(request: Request, q: str = Query(..., description="the text to search for"),
                     k: int = Query(10, description="results to return"),
                     rerank_k: int = Query(DEFAULT_RERANK_K,
                                           description="first-stage candidates reranked by the joint encoder")):
        """Top k images for one text query, in the reranked order and the first stage's order."""
        limits.check_query(q)
        limits.check_k(k)
        limits.check_rerank_k(rerank_k)
        (results, stages), info = await batcher.submit(text_key(rerank_k), TextJob([q], k), weight=1)
        p = prefix(request)
        result = results[0]
        return JSONResponse({"query": q, "k": k, "rerank_k": rerank_k, "generation": engine.generation,
                             "hits": [_with_urls(h, p) for h in result["hits"]],
                             "first_stage": [_with_urls(h, p) for h in result["first_stage"]],
                             "timings": _timings(stages, info)})

    @app.post("/search", response_model=None, responses=_documented(schemas.BatchResponse), tags=["search"])
    async def search_many(request: Request, body: schemas.BatchRequest):
        """Several text queries in one request; they are scored in one engine call."""
        queries = limits.check_queries(body.queries)
        limits.check_k(body.k)
        limits.check_rerank_k(body.rerank_k)
        (results, stages), info = await batcher.submit(text_key(body.rerank_k), TextJob(queries, body.k),
                                                       weight=len(queries))
        p = prefix(request)
        return JSONResponse({
            "k": body.k, "rerank_k": body.rerank_k, "generation": engine.generation,
            "results": [{"query": r["query"], "hits": [_with_urls(h, p) for h in r["hits"]],
                         "first_stage": [_with_urls(h, p) for h in r["first_stage"]]} for r in results],
            "timings": _timings(stages, info)})

    @app.post("/search/image", response_model=None, responses=_documented(schemas.ImageSearchResponse), tags=["search"])
    async def search_image(request: Request,
                           file: Annotated[Optional[UploadFile], File(description="an image to search with")] = None,
                           row: Annotated[Optional[int], Form(description="or an indexed row to search from")] = None,
                           k: Annotated[int, Form()] = 10):
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
                image = await run_in_threadpool(decode_image, data)
            except ValueError as e:
                raise HTTPException(400, f"not a usable image: {e}") from None
            job = ImageJob(k=k, pixels=await run_in_threadpool(engine.preprocess, image))
        (result, stages), info = await batcher.submit(IMAGE_KEY, job)
        if isinstance(result, Exception):
            raise result
        p = prefix(request)
        return JSONResponse({"query_row": row, "k": k, "generation": engine.generation,
                             "hits": [_with_urls(h, p) for h in result], "timings": _timings(stages, info)})

    # ------------------------------------------------------------------------------ files
    def indexed_path(row: str) -> str:  # a manifest look-up: called in the thread pool, off the event loop
        number = _row_number(row)
        path = engine.paths([number]).get(number)
        if path is None:
            raise HTTPException(404, f"row {row} is not in the index")
        return path

    @app.get("/images/{row}", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/*": {}}}, 404: {"model": schemas.ErrorOut}})
    async def image(row: str):
        """The original file of an indexed row (only files in the index are ever served)."""
        data, media_type, _ = await run_in_threadpool(lambda: read_indexed_file(indexed_path(row)))
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=60",
                                                               "X-Content-Type-Options": "nosniff"})

    @app.get("/thumbnails/{row}", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": schemas.ErrorOut}})
    async def thumbnail(request: Request, row: str):
        """A JPEG of the indexed image, at most thumbnail_size pixels on its longer side (cached)."""
        data, etag = await run_in_threadpool(lambda: thumbnails.get(indexed_path(row)))
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    # ------------------------------------------------------------------------------ status
    @app.get("/health", tags=["status"])
    async def health():
        """Liveness: answers at once, even while the search queue is full."""
        return {"status": "ok", "images": len(engine), "generation": engine.generation,
                "queued": batcher.queued}

    @app.get("/info", tags=["status"])
    async def info():
        """The index, the model, the server's limits and batching settings, and counters."""
        data = await batcher.call(engine.info)
        return {**data, "server_version": __version__, "limits": vars(limits), "batching": vars(batching),
                "served": {"batches": batcher.batches, "queries": batcher.queries,
                           "thumbnail_cache_hits": thumbnails.hits, "thumbnail_cache_misses": thumbnails.misses}}

    # ------------------------------------------------------------------------------ pages
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def gallery():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:",
                                           "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    swagger = _swagger_assets()
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs(request: Request):
        p = prefix(request)
        if swagger is None:  # no CDN fallback: users may be offline
            return HTMLResponse(f'<p>Install swagger-ui-py for the interactive page; the API schema is at '
                                f'<a href="{p}/openapi.json">{p}/openapi.json</a>.</p>')
        return get_swagger_ui_html(openapi_url=f"{p}/openapi.json", title="edje-search API",
                                   swagger_js_url=f"{p}/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{p}/docs-assets/swagger-ui.css",
                                   swagger_favicon_url=f"{p}/docs-assets/favicon-32x32.png")

    return app

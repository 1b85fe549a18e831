"""The FastAPI application: assembled from the route modules around one open Engine.

Every engine call goes through one :class:`~edje_search.serve.batching.MicroBatcher` and its
one thread. Routes live in ``routes_search.py`` (text and image search), ``routes_files.py``
(images and thumbnails), ``routes_pages.py`` (status, gallery, API docs), ``routes_scoring.py``
(pair scores and zero-shot labels) and ``routes_clip.py`` (clip-retrieval's API, for ClipClient
and clip-front); errors in
``error_handlers.py``; what they share in ``context.py``.
"""
from __future__ import annotations

import contextlib
import re

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..engine import Engine
from ..storage.roots import IndexedFolders
from .batching import BatchSettings, MicroBatcher
from .context import ServeContext
from .error_handlers import install_error_handlers
from .files import ThumbnailCache
from .hardening import BodyTimeout
from .limits import ServeLimits
from .login import add_login_routes
from .routes_clip import clip_front_dir, clip_router
from .routes_duplicates import duplicates_router
from .routes_files import files_router
from .routes_pages import mount_assets, pages_router, status_router
from .routes_scoring import UPLOAD_PATHS, scoring_router
from .routes_search import search_router
from .security import BodyLimit, InFlightLimit, RequestCounter, TokenAuth
from .service import SearchService

INDEX_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def create_app(engine: Engine, *, limits: ServeLimits | None = None, batching: BatchSettings | None = None,
               token: str | None = None, refresh_interval_s: float = 1.0, thumbnail_size: int = 256,
               max_in_flight: int | None = None, allowed_hosts: list[str] | None = None,
               index_name: str = "default", more_indexes: dict[str, Engine] | None = None) -> FastAPI:
    """The ASGI app serving ``engine``. ``token`` (when given) is required on every request;
    ``limits`` and ``batching`` default to :class:`ServeLimits` and :class:`BatchSettings`;
    ``max_in_flight`` requests at once (default: max_queue + max_batch), more get 503;
    ``allowed_hosts`` (when given) are the only Host header names answered (others get 400).

    ``more_indexes`` are served beside ``engine`` (named ``index_name``) through clip-retrieval's
    API (``indice_name``), each with its own engine thread; their files are under
    ``/indexes/NAME/images/ROW``. The gallery and edje-search's own API search ``engine``."""
    limits = limits or ServeLimits()
    batching = batching or BatchSettings()
    in_progress = RequestCounter()
    engines = {index_name: engine, **(more_indexes or {})}
    for name in engines:
        if not INDEX_NAME.fullmatch(name):
            raise ValueError(f"index name {name!r}: use letters, digits, '-' and '_'")
    contexts = {name: _context(e, limits, batching, refresh_interval_s, thumbnail_size, in_progress)
                for name, e in engines.items()}
    ctx = contexts[index_name]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for c in contexts.values():
            await c.batcher.start()
        try:
            yield
        finally:
            for c in contexts.values():
                await c.batcher.stop()

    app = FastAPI(title="edje-search", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Two-stage text-to-image search: first-stage embeddings recall, a joint encoder "
                              "reranks (EDJE). Limits: " + ", ".join(f"{k}={v}" for k, v in
                                                                   vars(limits).items()))
    app.state.batcher = ctx.batcher
    app.state.service = ctx.service
    app.state.thumbnails = ctx.thumbnails
    app.add_middleware(BodyLimit, limit_for=lambda path: limits.max_upload_bytes
                       if path in ("/search/image", "/knn-service") or path in UPLOAD_PATHS
                       else limits.max_json_bytes)
    app.add_middleware(BodyTimeout, seconds=limits.body_timeout_s)
    # every admitted search can be in the engine's queue or batch; more than that is refused at once
    app.add_middleware(InFlightLimit, limit=max_in_flight or batching.max_queue + batching.max_batch,
                       counter=in_progress)
    if token is not None:
        app.add_middleware(TokenAuth, token=token)
        add_login_routes(app, token)
    if allowed_hosts is not None:  # outermost: a foreign Host (DNS rebinding) gets 400 before anything else
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    install_error_handlers(app)
    for router in (search_router(ctx), files_router(ctx), duplicates_router(ctx), status_router(ctx),
                   scoring_router(ctx), pages_router()):
        app.include_router(router)
    prefixes = {name: "" if name == index_name else f"/indexes/{name}" for name in contexts}
    for name, c in contexts.items():
        if name != index_name:
            app.include_router(files_router(c), prefix=prefixes[name])
    app.include_router(clip_router(contexts, prefixes))
    mount_assets(app)
    front = clip_front_dir()
    if front is not None:  # clip-front's scripts and assets (its page and config.json are routes)
        app.mount("/clip-front", StaticFiles(directory=front), name="clip-front")
    return app


def _context(engine: Engine, limits: ServeLimits, batching: BatchSettings, refresh_interval_s: float,
             thumbnail_size: int, in_progress: RequestCounter) -> ServeContext:
    """One served index: its engine thread (micro-batcher), files and decode slots."""
    service = SearchService(engine, refresh_interval_s=refresh_interval_s)
    batcher = MicroBatcher(service.run, batching, before_batch=service.maybe_refresh,
                           coming=lambda: in_progress.value - batcher.queued_jobs - batcher.running_jobs)
    folders = IndexedFolders(engine.directory)
    return ServeContext(engine=engine, limits=limits, batching=batching, service=service, batcher=batcher,
                        folders=folders, thumbnails=ThumbnailCache(size=thumbnail_size, folders=folders),
                        decode_slots=anyio.CapacityLimiter(limits.max_concurrent_decodes))

"""Status routes (/health, /info) and pages: the gallery and the API docs, served from local
files (no CDN: users may be offline)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .context import ServeContext, url_prefix

STATIC_DIR = Path(__file__).parent / "static"


def swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-py package, served locally."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def status_router(ctx: ServeContext) -> APIRouter:
    router = APIRouter(tags=["status"])
    engine, batcher, thumbnails = ctx.engine, ctx.batcher, ctx.thumbnails

    @router.get("/health")
    async def health():
        """Liveness: answers at once, even while the search queue is full."""
        return {"status": "ok", "images": len(engine), "generation": engine.generation,
                "queued": batcher.queued}

    @router.get("/info")
    async def info():
        """The index, the model, the server's limits and batching settings, and counters."""
        data = await batcher.call(engine.info)
        return {**data, "server_version": __version__, "limits": vars(ctx.limits), "batching": vars(ctx.batching),
                "served": {"batches": batcher.batches, "queries": batcher.queries,
                           "thumbnail_cache_hits": thumbnails.hits, "thumbnail_cache_misses": thumbnails.misses}}

    return router


def pages_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    swagger = swagger_assets()

    @router.get("/", response_class=HTMLResponse)
    async def gallery():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:",
                                           "X-Content-Type-Options": "nosniff"})

    @router.get("/docs", response_class=HTMLResponse)
    async def docs(request: Request):
        p = url_prefix(request)
        if swagger is None:
            return HTMLResponse(f'<p>Install swagger-ui-py for the interactive page; the API schema is at '
                                f'<a href="{p}/openapi.json">{p}/openapi.json</a>.</p>')
        return get_swagger_ui_html(openapi_url=f"{p}/openapi.json", title="edje-search API",
                                   swagger_js_url=f"{p}/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{p}/docs-assets/swagger-ui.css",
                                   swagger_favicon_url=f"{p}/docs-assets/favicon-32x32.png")

    return router


def mount_assets(app) -> None:
    """The gallery's files and Swagger UI's (mounts are not carried by include_router)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    swagger = swagger_assets()
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")

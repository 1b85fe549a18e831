"""Every error the server returns is JSON ``{"error", "status"}``; unexpected ones are 500 with
no detail (the traceback goes to the server log)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..errors import BadInput, BadQuery, EdjeError, IndexCorrupt
from .batching import Overloaded
from .context import error_response
from .files import FileRefused
from .service import RowGone

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
        return error_response(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RowGone)
    async def row_gone(request: Request, exc: RowGone):
        return error_response(404, str(exc))

    @app.exception_handler(FileRefused)
    async def file_refused(request: Request, exc: FileRefused):
        return error_response(exc.status, str(exc))

    @app.exception_handler(IndexCorrupt)
    async def index_unavailable(request: Request, exc: IndexCorrupt):
        logger.error("index unavailable: %s", exc)
        return error_response(503, f"index unavailable: {exc}")

    async def bad_value(request: Request, exc: ValueError):
        return error_response(400, str(exc) or "bad request")

    # BadQuery and BadInput are EdjeErrors too: registered by name, as the handler lookup follows the MRO
    for cls in (BadQuery, BadInput, ValueError):  # ValueError: the engine's own argument checks
        app.add_exception_handler(cls, bad_value)

    @app.exception_handler(EdjeError)
    async def edje_error(request: Request, exc: EdjeError):
        logger.error("request failed: %s", exc)
        return error_response(500, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, "internal error (details are in the server log)")

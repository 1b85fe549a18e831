"""What every route of the server shares: the engine behind its micro-batcher, the limits, the
decode slots, and the small helpers that shape JSON answers."""
from __future__ import annotations

import dataclasses
import functools
import os

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..engine import Engine
from ..images import DecodeLimits, decode_untrusted
from ..storage.roots import IndexedFolders
from . import schemas
from .batching import BatchInfo, BatchSettings, MicroBatcher
from .files import ThumbnailCache
from .limits import ServeLimits
from .service import SearchService

ERRORS = {400: {"model": schemas.ErrorOut}, 401: {"model": schemas.ErrorOut}, 408: {"model": schemas.ErrorOut},
          413: {"model": schemas.ErrorOut}, 503: {"model": schemas.ErrorOut}}


@dataclasses.dataclass
class ServeContext:
    engine: Engine
    limits: ServeLimits
    batching: BatchSettings
    service: SearchService
    batcher: MicroBatcher
    folders: IndexedFolders
    thumbnails: ThumbnailCache
    # Every decode of untrusted bytes (uploads, thumbnails) and every indexed file read holds one of
    # these slots, so simultaneous requests add up to at most this many images' memory.
    decode_slots: anyio.CapacityLimiter

    async def in_decode_slot(self, fn, *args):
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.decode_slots)

    def decode_upload(self, data: bytes):
        """Uploaded bytes -> model pixels through the same guarded decode as indexing (the header is
        checked against the model's resize before any pixel is decoded)."""
        image_size, resize_mode = self.engine.image_input
        limits = DecodeLimits(max_file_bytes=self.limits.max_upload_bytes)
        return self.engine.preprocess(decode_untrusted(data, limits, image_size, resize_mode=resize_mode))


def documented(model) -> dict:
    """OpenAPI responses for a route that returns a ready JSONResponse: the body is built as
    plain dicts and not validated again per request (tests check it against ``model``)."""
    return {200: {"model": model}, **ERRORS}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def timings(stages: dict, info: BatchInfo) -> dict:
    return {"stages_ms": stages, "queue_ms": round(info.queue_ms, 3), "batch_queries": info.queries,
            "batch_requests": info.jobs}


def with_urls(hit: dict, prefix: str) -> dict:
    """URLs of the hit's image, and ``missing`` when its file is gone from disk (the index still
    names it until the next build drops it)."""
    return {**hit, "image_url": f"{prefix}/images/{hit['row']}", "thumbnail_url": f"{prefix}/thumbnails/{hit['row']}",
            "missing": not os.path.exists(hit["path"])}


def url_prefix(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def row_number(row: str) -> int:
    """A row from the URL: decimal digits only (anything else, traversal attempts included, is 404)."""
    if not row.isascii() or not row.isdigit() or len(row) > 12:
        raise HTTPException(404, f"no indexed image {row!r}: images are addressed by row number")
    return int(row)

"""The indexed images and their thumbnails, addressed by row number of the open generation (a
path never comes from the client), each read in a decode slot."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from . import schemas
from .context import ServeContext, row_number
from .files import read_indexed_file


def files_router(ctx: ServeContext) -> APIRouter:
    router = APIRouter(tags=["images"])
    engine, folders, thumbnails = ctx.engine, ctx.folders, ctx.thumbnails

    def indexed_path(row: str) -> str:  # a manifest look-up: called in the thread pool, off the event loop
        number = row_number(row)
        path = engine.paths([number]).get(number)
        if path is None:
            raise HTTPException(404, f"row {row} is not in the index")
        return path

    @router.get("/images/{row}", response_class=Response,
                responses={200: {"content": {"image/*": {}}}, 404: {"model": schemas.ErrorOut}})
    async def image(row: str):
        """The original file of an indexed row (only files in the index are ever served)."""
        data, media_type, _ = await ctx.in_decode_slot(lambda: read_indexed_file(indexed_path(row), folders))
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=60",
                                                               "X-Content-Type-Options": "nosniff"})

    @router.get("/thumbnails/{row}", response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": schemas.ErrorOut}})
    async def thumbnail(request: Request, row: str):
        """A JPEG of the indexed image, at most thumbnail_size pixels on its longer side (cached)."""
        data, etag = await ctx.in_decode_slot(lambda: thumbnails.get(indexed_path(row)))
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    return router

"""clip-retrieval's back-end API on edje-search's server, so `ClipClient` and clip-front work
unchanged: ``POST /knn-service``, ``POST /metadata``, ``GET /indices-list`` (field names and
response shapes as clip-retrieval's ``clip_back.py`` defines them), and clip-front itself at
``/clip-front/`` when the clip-retrieval package is installed.

Differences a clip-retrieval user should know: text queries are reranked by the joint encoder
and ``similarity`` is the score they were ranked by (the joint encoder's logit, plus the model's
fusion weight times the cosine; not a cosine); image and ``embedding_input`` queries return
first-stage neighbours with ``similarity`` the cosine. At most ``max_k`` ids come back
(clip-front asks for 3,000). The safety, violence and aesthetic options need models this
server does not have and are ignored, as clip back ignores them when those models are absent;
``modality="text"`` (a caption index) and ``image_url`` (the server fetching a remote URL) are
refused with 400.
"""
from __future__ import annotations

import base64
import binascii
import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from ..storage.duplicates import collapse_vectors
from ..validation import MAX_ROW
from .context import ServeContext
from .service import IMAGE_KEY, ImageJob, TextJob, text_key

DUPLICATE_COSINE = 0.94  # clip back's threshold for "the same image" among results


class KnnRequest(BaseModel):
    """The body ClipClient and clip-front send (unknown fields are ignored, as clip back does)."""

    model_config = ConfigDict(extra="ignore")
    text: Optional[str] = None
    image: Optional[str] = None  # base64 of the image file
    image_url: Optional[str] = None
    embedding_input: Optional[list[float]] = None
    modality: str = "image"
    num_images: int = 40
    num_result_ids: Optional[int] = None
    indice_name: Optional[str] = None
    deduplicate: bool = False
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Any = None
    aesthetic_weight: Any = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int]
    indice_name: Optional[str] = None


async def _json_body(request: Request, model):
    # clip-front posts JSON without a JSON content type (clip back parses with force=True)
    try:
        return model.model_validate(json.loads(await request.body()))
    except (ValueError, ValidationError) as e:
        raise HTTPException(400, f"invalid request: {str(e).splitlines()[0]}") from None


def clip_front_dir() -> Path | None:
    """clip-front's built page, shipped in clip-retrieval's wheel as a top-level ``front/build``."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        return None
    build = Path(list(spec.submodule_search_locations)[0]).parent / "front" / "build"
    return build if (build / "index.html").is_file() else None


def clip_router(contexts: dict[str, ServeContext], url_prefixes: dict[str, str]) -> APIRouter:
    """Routes over every served index; ``url_prefixes[name]`` is where that index's images are."""
    router = APIRouter(tags=["clip-retrieval"])
    default = next(iter(contexts))

    def pick(name: Optional[str]) -> tuple[str, ServeContext]:
        name = name or default
        if name not in contexts:
            raise HTTPException(404, f"no index named {name!r}; served: {', '.join(contexts)}")
        return name, contexts[name]

    async def results(request: Request, name: str, ctx: ServeContext, scored: list[tuple[int, float]],
                      num_images: int) -> list[dict]:
        shown = [row for row, _ in scored[:num_images]]  # a manifest read: on the engine thread, off the event loop
        metas = await ctx.batcher.call(lambda: ctx.engine.metadata(shown))
        base = str(request.base_url).rstrip("/") + url_prefixes[name]
        out = []
        for i, (row, similarity) in enumerate(scored):
            item = {"id": row, "similarity": similarity}
            if i < num_images and row in metas:
                meta = dict(metas[row])
                item.update({k: v for k, v in meta.items() if k != "path"}, image_path=meta["path"],
                            url=f"{base}/images/{row}")
            out.append(item)
        return out

    @router.get("/indices-list")
    async def indices_list():
        """The names of the served indexes (the first is the default)."""
        return list(contexts)

    @router.post("/knn-service")
    async def knn_service(request: Request):
        """clip back's search: text (reranked), a base64 image or an embedding (first-stage neighbours)."""
        body = await _json_body(request, KnnRequest)
        name, ctx = pick(body.indice_name)
        given = [x is not None for x in (body.text, body.image, body.image_url, body.embedding_input)]
        if sum(given) != 1:
            raise HTTPException(400, "give exactly one of text, image, image_url and embedding_input")
        if body.modality != "image":
            raise HTTPException(400, "this server indexes images only: use modality 'image'")
        if body.image_url is not None:
            raise HTTPException(400, "image_url is not supported: this server never fetches remote URLs "
                                     "(send the image itself as base64 in 'image')")
        k = max(1, min(body.num_result_ids or body.num_images, ctx.limits.max_k))
        if body.text is not None:
            ctx.limits.check_query(body.text)
            rerank_k = min(k, ctx.limits.max_rerank_k)
            (found, _), _ = await ctx.batcher.submit(text_key(rerank_k), TextJob([body.text], k), weight=1)
            scored = [(h["row"], h["score"] if h["score"] is not None else h["first_stage_score"])
                      for h in found[0]["hits"]]
        elif body.image is not None:
            try:
                data = base64.b64decode(body.image, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, "image must be the base64 of an image file") from None
            try:
                pixels = await ctx.in_decode_slot(ctx.decode_upload, data)
            except ValueError as e:
                raise HTTPException(400, f"not a usable image: {e}") from None
            (found, _), _ = await ctx.batcher.submit(IMAGE_KEY, ImageJob(k=k, pixels=pixels))
            scored = [(h["row"], h["first_stage_score"]) for h in found]
        else:
            vector = np.asarray(body.embedding_input, dtype=np.float32)[None, :]
            norm = float(np.linalg.norm(vector))
            if not np.isfinite(norm) or norm == 0:
                raise HTTPException(400, "embedding_input must be a finite, non-zero vector")
            scores, rows = await ctx.batcher.call(lambda: ctx.engine.search_vectors(vector / norm, k))
            scored = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        if body.deduplicate and len(scored) > 1:
            vectors = await ctx.batcher.call(lambda: ctx.engine.vectors([r for r, _ in scored]))
            scored = [scored[group[0]] for group in collapse_vectors(vectors, DUPLICATE_COSINE)]
        return JSONResponse(await results(request, name, ctx, scored, max(0, body.num_images)))

    @router.post("/metadata")
    async def metadata(request: Request):
        """clip back's metadata look-up: ids -> [{"id", "metadata"}] (ids not in the index are left out)."""
        body = await _json_body(request, MetadataRequest)
        name, ctx = pick(body.indice_name)
        if len(body.ids) > 10_000:
            raise HTTPException(400, "at most 10,000 ids per request")
        wanted = [i for i in body.ids if 0 <= i <= MAX_ROW]  # SQLite integers are 64-bit
        metas = await ctx.batcher.call(lambda: ctx.engine.metadata(wanted))
        base = str(request.base_url).rstrip("/") + url_prefixes[name]
        out = []
        for row in body.ids:
            if row in metas:
                meta = dict(metas[row])
                path = meta.pop("path")
                out.append({"id": row, "metadata": {**meta, "image_path": path, "url": f"{base}/images/{row}"}})
        return out

    front = clip_front_dir()
    if front is not None:
        @router.get("/clip-front/config.json", include_in_schema=False)
        async def front_config(request: Request):
            back = str(request.base_url).rstrip("/")
            return {"defaultBackend": back, "defaultIndex": default, "urlColumn": "url"}

        @router.get("/clip-front/", include_in_schema=False)
        async def front_page():
            return FileResponse(front / "index.html")

    return router

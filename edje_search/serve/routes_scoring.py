"""POST /score and POST /classify (and their /image forms for an uploaded image): joint-encoder
scores of texts against indexed rows or an upload, and zero-shot labels.

Engine work runs in the batcher's engine thread (``MicroBatcher.call``), as searches do.
"""
from __future__ import annotations

from typing import Annotated, Awaitable, Callable

import numpy as np
import torch
from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..classify import ClassifySettings, LabelSet, check_labels, classify_rows
from ..errors import BadQuery
from ..pipeline import embed_pixels
from ..scoring import embed_captions
from .context import ServeContext
from .limits import ServeLimits

# the routes whose bodies are image uploads (the body limit is max_upload_bytes, not max_json_bytes)
UPLOAD_PATHS = frozenset({"/score/image", "/classify/image"})


class ScoreRequest(BaseModel):
    texts: list[str] = Field(description="one text per row, or a single text scored against every row")
    rows: list[int] = Field(description="indexed rows")


class ClassifyRequest(BaseModel):
    labels: list[str]
    rows: list[int] = Field(description="indexed rows to label")
    template: str = "a photo of {}"
    shortlist: int = Field(5, description="labels per image, nearest by first-stage cosine, scored jointly")
    top_k: int = 3
    multi_label: bool = False
    min_prob: float = 0.5


def _settings(template: str, shortlist: int, top_k: int, multi_label: bool, min_prob: float,
              limits: ServeLimits) -> ClassifySettings:
    if not 1 <= shortlist <= limits.max_rerank_k:
        raise BadQuery(f"shortlist must be between 1 and {limits.max_rerank_k} (got {shortlist})")
    return ClassifySettings(template=template, shortlist=shortlist, top_k=top_k, multi_label=multi_label,
                            min_prob=min_prob)


def _check_texts(texts: list[str], limits: ServeLimits, what: str) -> list[str]:
    if not texts:
        raise BadQuery(f"no {what}: give at least one")
    if len(texts) > limits.max_rerank_k:
        raise BadQuery(f"too many {what} in one request ({len(texts)}; this server allows {limits.max_rerank_k})")
    return [limits.check_query(t) for t in texts]


def _check_rows(rows: list[int], limits: ServeLimits) -> list[int]:
    if not rows:
        raise BadQuery("no rows: give at least one")
    if len(rows) > limits.max_rerank_k:
        raise BadQuery(f"too many rows in one request ({len(rows)}; this server allows {limits.max_rerank_k})")
    return rows


async def _upload_pixels(decode: Callable[[bytes], Awaitable[torch.Tensor]], file: UploadFile) -> torch.Tensor:
    data = await file.read()
    try:
        return await decode(data)
    except ValueError as e:
        raise HTTPException(400, f"not a usable image: {e}") from None


def _embed_upload(model, pixels: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    vectors, tokens = embed_pixels(model, pixels[None], token_dtype="float32")
    return vectors, torch.from_numpy(tokens)


def scoring_router(ctx: ServeContext) -> APIRouter:
    engine, batcher, limits = ctx.engine, ctx.batcher, ctx.limits
    router = APIRouter(tags=["scores"])

    def decode(data: bytes) -> Awaitable[torch.Tensor]:  # the guarded decode /search/image uses
        return ctx.in_decode_slot(ctx.decode_upload, data)

    @router.post("/score", response_model=None)
    async def score(body: ScoreRequest):
        """Joint-encoder logit, match probability (the model's calibration, else sigmoid(logit)) and
        first-stage cosine of (text, indexed row) pairs."""
        rows = _check_rows(body.rows, limits)
        texts = _check_texts(body.texts, limits, "texts")
        if len(texts) == 1:
            texts = texts * len(rows)
        if len(texts) != len(rows):
            raise BadQuery(f"{len(texts)} texts for {len(rows)} rows: give one text per row, or a single text")

        def work():
            scorer = engine.scorer()
            logits, cosines = scorer.score_texts(texts, rows)
            return logits, scorer.model.match_probability(logits), cosines, engine.paths(rows), engine.generation

        logits, probs, cosines, paths, gen = await batcher.call(work)
        return JSONResponse({"generation": gen, "results": [
            {"text": t, "row": r, "path": paths[r], "logit": float(lg), "prob": float(pr), "cosine": float(c)}
            for t, r, lg, pr, c in zip(texts, rows, logits, probs, cosines)]})

    @router.post("/score/image", response_model=None)
    async def score_image(file: Annotated[UploadFile, File(description="the image")],
                          texts: Annotated[list[str], Form(description="texts to score against it (repeat)")]):
        """The same scores for texts against an uploaded image (the vision tower runs once)."""
        texts = _check_texts(texts, limits, "texts")
        pixels = await _upload_pixels(decode, file)

        def work():
            model = engine.scorer().model
            vectors, tokens = _embed_upload(model, pixels)
            logits = model.reranker.score_pairs(texts, tokens, np.arange(len(texts)), np.zeros(len(texts), int))
            return logits, model.match_probability(logits), embed_captions(model, texts) @ vectors[0]

        logits, probs, cosines = await batcher.call(work)
        return JSONResponse({"results": [{"text": t, "logit": float(lg), "prob": float(pr), "cosine": float(c)}
                                         for t, lg, pr, c in zip(texts, logits, probs, cosines)]})

    @router.post("/classify", response_model=None)
    async def classify(body: ClassifyRequest):
        """Zero-shot labels of indexed rows: the first stage shortlists, the joint encoder decides."""
        labels = check_labels(_check_texts(body.labels, limits, "labels"))
        rows = _check_rows(body.rows, limits)
        settings = _settings(body.template, body.shortlist, body.top_k, body.multi_label, body.min_prob, limits)

        def work():
            return list(classify_rows(engine.scorer(), labels, rows, settings)), engine.generation

        results, gen = await batcher.call(work)
        return JSONResponse({"generation": gen, "results": results})

    @router.post("/classify/image", response_model=None)
    async def classify_image(file: Annotated[UploadFile, File(description="the image")],
                             labels: Annotated[list[str], Form(description="candidate labels (repeat)")],
                             template: Annotated[str, Form()] = "a photo of {}",
                             shortlist: Annotated[int, Form()] = 5, top_k: Annotated[int, Form()] = 3,
                             multi_label: Annotated[bool, Form()] = False,
                             min_prob: Annotated[float, Form()] = 0.5):
        """Zero-shot labels of an uploaded image."""
        labels = check_labels(_check_texts(labels, limits, "labels"))
        settings = _settings(template, shortlist, top_k, multi_label, min_prob, limits)
        pixels = await _upload_pixels(decode, file)

        def work():
            model = engine.scorer().model
            vectors, tokens = _embed_upload(model, pixels)
            return LabelSet(model, labels, settings).classify(vectors, tokens)[0]

        return JSONResponse(await batcher.call(work))

    return router


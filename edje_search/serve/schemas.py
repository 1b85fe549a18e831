"""Request and response bodies of the JSON API (they also make the OpenAPI page at /docs)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from ..config import DEFAULT_RERANK_K


class HitOut(BaseModel):
    rank: int = Field(description="position in the reranked order (1 = best); may exceed k in `first_stage`")
    first_stage_rank: int = Field(description="position in the first stage's order of the same candidates")
    row: int
    path: str
    first_stage_score: float = Field(description="cosine similarity of the first-stage embeddings")
    rerank_score: Optional[float] = Field(None, description="joint-encoder logit (null beyond rerank_k)")
    score: Optional[float] = Field(None, description="what the hit was ranked by: rerank_score + fusion_weight "
                                                     "x first_stage_score (null beyond rerank_k)")
    prob: Optional[float] = Field(None, description="match probability: the joint-encoder logit through the model's "
                                                    "calibration, sigmoid(logit) when uncalibrated (null beyond "
                                                    "rerank_k)")
    image_url: str
    thumbnail_url: str
    missing: bool = Field(False, description="the image file is gone from disk (the next build drops the row)")


class Timings(BaseModel):
    stages_ms: dict[str, float] = Field(description="engine milliseconds per stage of the engine call that served "
                                                    "this request (shared by the requests batched with it)")
    queue_ms: float = Field(description="time this request waited before its engine call started")
    batch_queries: int = Field(description="queries in that engine call")
    batch_requests: int = Field(description="requests in that engine call")


class SearchResult(BaseModel):
    query: str
    hits: list[HitOut] = Field(description="top k in the reranked order")
    first_stage: list[HitOut] = Field(description="top k in the first stage's order")


WHERE_HELP = ('metadata filter, e.g. taken >= "2023-06-01" and make = "Canon" (docs/filters.md); only images '
              'passing it are searched, and an invalid filter is a 400 naming the position and the fields')
MIN_PROB_HELP = ("only hits whose match probability (prob) is at least this, between 0 and 1: possibly none (an "
                 "empty list); only reranked hits have one, so at most rerank_k hits come back")
SORT_HELP = ("order the top k by a metadata field instead of relevance: date, taken, mtime, size, name, ... "
             "ascending, -FIELD descending (-date: newest first); hits without the field come last")


class SearchResponse(SearchResult):
    k: int
    rerank_k: int
    min_prob: Optional[float] = None
    sort: Optional[str] = None
    generation: int
    timings: Timings


class BatchRequest(BaseModel):
    queries: list[str]
    k: int = 10
    rerank_k: int = DEFAULT_RERANK_K
    where: Optional[str] = Field(None, description=WHERE_HELP)
    min_prob: Optional[float] = Field(None, description=MIN_PROB_HELP)
    sort: Optional[str] = Field(None, description=SORT_HELP)


class BatchResponse(BaseModel):
    k: int
    rerank_k: int
    min_prob: Optional[float] = None
    sort: Optional[str] = None
    generation: int
    results: list[SearchResult]
    timings: Timings


class NeighbourOut(BaseModel):
    rank: int
    row: int
    path: str
    first_stage_score: float = Field(description="cosine similarity of the first-stage image embeddings")
    image_url: str
    thumbnail_url: str
    missing: bool = Field(False, description="the image file is gone from disk (the next build drops the row)")


class ImageSearchResponse(BaseModel):
    query_row: Optional[int] = Field(None, description="the indexed row searched from (left out of the results)")
    k: int
    generation: int
    hits: list[NeighbourOut]
    timings: Timings


class ErrorOut(BaseModel):
    error: str
    status: int

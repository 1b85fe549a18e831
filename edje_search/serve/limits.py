"""What one request may ask for, checked before any work is queued.

Every limit is a field of :class:`ServeLimits`, so `edje-search serve` options and tests set
them in one place, and ``GET /info`` reports them to clients.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..errors import BadQuery
from ..validation import MAX_QUERY_CHARS, check_query


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    max_query_chars: int = 500
    max_k: int = 100
    max_rerank_k: int = 200
    max_batch_queries: int = 32  # queries in one POST /search
    max_upload_bytes: int = 20 * 1024 * 1024  # body of POST /search/image
    max_json_bytes: int = 256 * 1024  # any other request body
    body_timeout_s: float = 30.0  # a request body must arrive whole within this
    max_concurrent_decodes: int = 2  # uploads, thumbnails and file reads decoding at once

    def __post_init__(self):
        if not 1 <= self.max_query_chars <= MAX_QUERY_CHARS:
            raise ValueError(f"max_query_chars must be between 1 and the engine's {MAX_QUERY_CHARS}")
        for name in ("max_k", "max_rerank_k", "max_batch_queries", "max_upload_bytes", "max_json_bytes",
                     "max_concurrent_decodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if not self.body_timeout_s > 0:
            raise ValueError("body_timeout_s must be positive")

    def check_query(self, text: str) -> str:
        """The library's query rule (validation.check_query) with this server's length limit."""
        return check_query(text, max_chars=self.max_query_chars)

    def check_queries(self, queries: Sequence[str]) -> list[str]:
        if not queries:
            raise BadQuery("no queries: give at least one")
        if len(queries) > self.max_batch_queries:
            raise BadQuery(f"too many queries in one request ({len(queries)}; this server allows "
                           f"{self.max_batch_queries})")
        return [self.check_query(q) for q in queries]

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise BadQuery(f"k must be between 1 and {self.max_k} (got {k})")
        return k

    def check_rerank_k(self, rerank_k: int) -> int:
        if not 0 <= rerank_k <= self.max_rerank_k:
            raise BadQuery(f"rerank_k must be between 0 and {self.max_rerank_k} (got {rerank_k})")
        return rerank_k

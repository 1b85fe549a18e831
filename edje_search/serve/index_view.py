"""The few things the server needs from an Engine beyond search_batch/refresh/info.

Kept in one place so a change in the storage layer touches only this file: the path of a
row in the open generation, and first-stage image-to-image neighbours (the first-stage model
embeds images; its FAISS index holds image embeddings, so an image query is a plain
nearest-neighbour search there).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..engine import Engine
from ..validation import MAX_ROW


def path_of_row(engine: Engine, row: int) -> str | None:
    """The indexed file of ``row`` in the open generation, or None if the row is not live (or
    cannot be a row at all: SQLite refuses integers outside 64 bits with OverflowError)."""
    row = int(row)
    if not 0 <= row <= MAX_ROW:
        return None
    return engine.paths([row]).get(row)


def image_count(engine: Engine) -> int:
    return len(engine.store)


def generation(engine: Engine) -> int:
    return int(engine.generation)


def decode_settings(engine: Engine) -> tuple[int, str]:
    """(input side, resize mode) of the first stage: what the decode guard checks an image against."""
    config = engine.model.first_stage.config
    return int(config.image_size), str(config.resize_mode)


def preprocess(engine: Engine, image: Image.Image) -> torch.Tensor:
    """A decoded RGB image -> (3, H, W) pixels as the first stage expects them."""
    return engine.model.first_stage.preprocess(image)


@torch.inference_mode()
def embed_pixels(engine: Engine, pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) -> (B, E) float32 normalised first-stage image embeddings."""
    vectors, _ = engine.model.embed_images(pixels)
    return vectors.cpu().numpy().astype(np.float32)


def row_vectors(engine: Engine, rows: list[int]) -> np.ndarray:
    """(len(rows), E) stored first-stage embeddings of live rows."""
    return np.asarray(engine.store.vectors(rows), dtype=np.float32)


def nearest_rows(engine: Engine, vectors: np.ndarray, k: int,
                 exclude: list[int | None]) -> list[list[tuple[int, float]]]:
    """Top ``k`` (row, similarity) per query vector, leaving out ``exclude[i]`` (the query's own row)."""
    n = len(engine.store)
    if n == 0:
        return [[] for _ in range(len(vectors))]
    scores, rows = engine.search_vectors(vectors, min(k + 1, n))
    out = []
    for qi in range(len(vectors)):
        hits = [(int(r), float(s)) for r, s in zip(rows[qi], scores[qi]) if r >= 0 and r != exclude[qi]]
        out.append(hits[:k])
    return out

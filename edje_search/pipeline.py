"""Indexing pipeline stage: image files -> (first-stage vectors, stored tokens).

Hand-off: :func:`embed_files` yields :class:`EmbeddedBatch` objects; the engine commits them
to its index store. Decoding runs in DataLoader workers while the model runs.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import image_loader
from .models.bundle import EdjeModel


@torch.no_grad()
def encode_image_files(first_stage, paths: list, *, batch_size: int = 64, num_workers: int = 1,
                       progress: bool = True, desc: str = "encoding images") -> tuple[torch.Tensor, torch.Tensor]:
    """First-stage pass over image files that must all be readable (training and evaluation sets).

    Returns (normalised embeddings (N, E) float32, vision tokens (N, n, D_v) float16), on CPU.
    """
    device = next(first_stage.parameters()).device
    embs, toks = [], []
    loader = image_loader([str(p) for p in paths], first_stage.preprocess, batch_size, num_workers,
                          min_size=first_stage.config.image_size, resize_mode=first_stage.config.resize_mode)
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        if batch["failed"]:
            index, reason = batch["failed"][0]
            raise ValueError(f"unreadable image: {paths[index]}: {reason}")
        e, t = first_stage.encode_image(batch["pixels"].to(device))
        embs.append(e.float().cpu())
        toks.append(t.half().cpu())
    return torch.cat(embs), torch.cat(toks)


@dataclasses.dataclass
class EmbeddedBatch:
    paths: list[str]
    hashes: list[str]
    vectors: np.ndarray  # (b, E) float32, L2-normalised
    tokens: np.ndarray  # (b, m, d) in the store's dtype
    failed: list[tuple[str, str]]  # (path, reason)
    # (path, sha256, (size, mtime_ns)) of files whose content is already embedded
    duplicates: list[tuple[str, str, tuple[int, int]]] = dataclasses.field(default_factory=list)
    stats: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (size, mtime_ns) as read, per path


def embed_files(model: EdjeModel, paths: list[str], *, batch_size: int = 32, num_workers: int = 2,
                token_dtype: str = "float16", progress: bool = True,
                known_hashes: frozenset[str] = frozenset()) -> Iterator[EmbeddedBatch]:
    """Decode and embed ``paths`` in order; unreadable files come back in ``failed`` with a reason
    (see :class:`~edje_search.images.ImageFileDataset`), files whose content hash is in
    ``known_hashes`` come back in ``duplicates`` without running the model."""
    config = model.first_stage.config
    loader = image_loader(paths, model.first_stage.preprocess, batch_size, num_workers, known_hashes,
                          min_size=config.image_size, resize_mode=config.resize_mode)
    bar = tqdm(total=len(paths), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            failed = [(paths[i], reason) for i, reason in batch["failed"]]
            dups = [(paths[i], sha, stat) for i, sha, stat in batch["duplicates"]]
            if batch["pixels"] is None:
                yield EmbeddedBatch([], [], np.zeros((0, model.first_stage.embed_dim), np.float32),
                                    np.zeros((0, model.reranker.config.tokens_per_image, model.reranker.token_width),
                                             token_dtype), failed, dups)
            else:
                with torch.inference_mode():
                    vectors, tokens = model.embed_images(batch["pixels"])
                yield EmbeddedBatch([paths[i] for i in batch["index"]], batch["sha256"],
                                    vectors.cpu().numpy().astype(np.float32),
                                    tokens.cpu().numpy().astype(token_dtype), failed, dups, batch["stat"])
            bar.update(len(batch["index"]) + len(failed) + len(dups))
    finally:
        bar.close()

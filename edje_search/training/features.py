"""Frozen first-stage outputs of a training set, computed once and cached on disk.

A cache is keyed by the image list, the captions and a hash of the first stage's weights, so a
file written for another model or data set is never used. ``train first-stage`` writes one for
its own training set (it already holds the locked text tower's outputs, the costly half), which
``train reranker --features`` then reuses instead of encoding every caption a second time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.annotations import CaptionSet
from ..models.first_stage import FirstStage
from ..pipeline import encode_image_files
from .common import save_checkpoint

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainFeatures:
    image_emb: torch.Tensor  # (N, E) float32, normalised
    vision_tokens: torch.Tensor  # (N, n, D_v) float16
    text_emb: torch.Tensor  # (C, E) float32, normalised


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes) of ``module``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def features_key(first_stage: FirstStage, data: CaptionSet) -> dict:
    """What a cache must match to be used: the data and the exact first stage."""
    return {"images": [str(p) for p in data.images], "captions": list(data.captions),
            "first_stage": first_stage.config.model_cfg, "weights": weights_hash(first_stage)}


def load_cached_features(path: Path, key: dict) -> TrainFeatures | None:
    """The features in ``path`` when it exists and was written for ``key``; None otherwise."""
    if not Path(path).is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("key") != key:
        logger.info("%s was computed for another first stage or data set; not used", path)
        return None
    return TrainFeatures(saved["image_emb"], saved["vision_tokens"], saved["text_emb"])


def save_features(path: Path, key: dict, feats: TrainFeatures) -> None:
    save_checkpoint(Path(path), key=key, **dataclasses.asdict(feats))


@torch.no_grad()
def compute_features(first_stage: FirstStage, data: CaptionSet, *, cache: Path | None = None,
                     reuse: Path | None = None, text_emb: torch.Tensor | None = None, batch_size: int = 128,
                     num_workers: int = 1, progress: bool = True) -> TrainFeatures:
    """Image embeddings, vision tokens and caption embeddings of ``data``.

    Read from ``cache`` or else ``reuse`` when either was written for this first stage and data;
    otherwise computed (``text_emb`` (C, E), when the caller already has the caption embeddings,
    skips the text pass) and written to ``cache``.
    """
    key = features_key(first_stage, data)
    for path in (cache, reuse):
        feats = load_cached_features(path, key) if path is not None else None
        if feats is not None:
            return feats
    image_emb, vision_tokens = encode_image_files(first_stage, data.images, batch_size=batch_size,
                                                  num_workers=num_workers, progress=progress,
                                                  desc="first-stage features")
    if text_emb is None:
        unique = sorted(set(data.captions))
        where = {c: i for i, c in enumerate(unique)}
        text = torch.cat([first_stage.encode_text(unique[s:s + 512]).float().cpu()
                          for s in tqdm(range(0, len(unique), 512), desc="caption features",
                                        disable=not progress)])
        text_emb = text[torch.tensor([where[c] for c in data.captions])]
    feats = TrainFeatures(image_emb, vision_tokens, text_emb.float().cpu())
    if cache is not None:
        save_features(cache, key, feats)
    return feats

"""Frozen first-stage outputs of a training set, computed once and cached on disk.

A cache is keyed by the images (resolved paths), the captions, the first stage's config and a
hash of its weights, so a file written for another first stage or data set is not used (the
image files' content is not hashed: re-rendered images under the same names need a new cache).
``train first-stage`` writes one for its own training set (it already holds the locked text
tower's outputs, the costly half), which ``train reranker --features`` then reuses instead of
encoding every image and caption a second time.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.annotations import CaptionSet
from ..models.first_stage import FirstStage
from ..models.loading import weights_hash
from ..pipeline import encode_image_files
from .common import save_checkpoint

logger = logging.getLogger(__name__)

FEATURES_NAME = "features.pt"  # in a first-stage run folder (train first-stage --out) and a reranker's
FORMAT = 2  # bump when what a feature file holds, or how it is computed, changes


@dataclasses.dataclass
class TrainFeatures:
    image_emb: torch.Tensor  # (N, E) float32, normalised
    vision_tokens: torch.Tensor  # (N, n, D_v) float16
    text_emb: torch.Tensor  # (C, E) float32, normalised


def features_key(first_stage: FirstStage, data: CaptionSet) -> dict:
    """What a cache must match to be used: the data and the exact first stage."""
    return {"format": FORMAT, "images": [str(Path(p).resolve()) for p in data.images],
            "captions": list(data.captions), "first_stage": dataclasses.asdict(first_stage.config),
            "weights": weights_hash(first_stage)}


def load_cached_features(path: Path, key: dict, *, explicit: bool = False) -> TrainFeatures | None:
    """The features in ``path`` when it exists and was written for ``key``; None otherwise.

    ``explicit``: the user named this file, so a mismatch is a warning that says what differs.
    """
    if not Path(path).is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    stored = saved.get("key", {})
    if stored != key:
        differs = [k for k in key if stored.get(k) != key[k]]
        (logger.warning if explicit else logger.info)(
            "%s was computed for another %s; not used: encoding the training set instead", path,
            " and ".join({"images": "image list", "captions": "caption list", "first_stage": "first-stage config",
                          "weights": "first stage (weights)", "format": "file format"}[k] for k in differs))
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
    otherwise computed and written to ``cache``. ``text_emb`` (C, E): the caption embeddings when
    the caller already has them (the first-stage trainer, from its locked text features; a test
    pins them to ``encode_text``'s), which skips the text pass.
    """
    key = features_key(first_stage, data) if cache is not None or reuse is not None else None
    for path, explicit in ((cache, False), (reuse, True)):
        feats = load_cached_features(path, key, explicit=explicit) if path is not None else None
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

"""Frozen first-stage outputs of a training set, computed once and cached on disk."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.annotations import CaptionSet
from ..models.first_stage import FirstStage
from ..pipeline import encode_image_files
from .common import save_checkpoint


@dataclasses.dataclass
class TrainFeatures:
    image_emb: torch.Tensor  # (N, E) float32, normalised
    vision_tokens: torch.Tensor  # (N, n, D_v) float16
    text_emb: torch.Tensor  # (C, E) float32, normalised


@torch.no_grad()
def compute_features(first_stage: FirstStage, data: CaptionSet, *, cache: Path | None = None,
                     batch_size: int = 128, num_workers: int = 1, progress: bool = True) -> TrainFeatures:
    """Image embeddings, vision tokens and caption embeddings of ``data`` (cached in ``cache``)."""
    key = {"images": [str(p) for p in data.images], "captions": data.captions,
           "first_stage": first_stage.config.model_cfg}
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            return TrainFeatures(saved["image_emb"], saved["vision_tokens"], saved["text_emb"])
    image_emb, vision_tokens = encode_image_files(first_stage, data.images, batch_size=batch_size,
                                                  num_workers=num_workers, progress=progress,
                                                  desc="first-stage features")
    unique = sorted(set(data.captions))
    where = {c: i for i, c in enumerate(unique)}
    text = torch.cat([first_stage.encode_text(unique[s:s + 512]).float().cpu()
                      for s in tqdm(range(0, len(unique), 512), desc="caption features", disable=not progress)])
    feats = TrainFeatures(image_emb, vision_tokens, text[torch.tensor([where[c] for c in data.captions])])
    if cache is not None:
        save_checkpoint(cache, key=key, **dataclasses.asdict(feats))
    return feats

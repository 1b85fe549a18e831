"""Frozen first-stage outputs of a training set, computed once and cached on disk."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.annotations import CaptionSet
from ..images import image_loader
from ..models.first_stage import FirstStage
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
    device = next(first_stage.parameters()).device
    embs, toks = [], []
    loader = image_loader([str(p) for p in data.images], first_stage.preprocess, batch_size, num_workers)
    for batch in tqdm(loader, desc="first-stage features", disable=not progress, unit="batch"):
        if batch["failed"]:
            path, reason = data.images[batch["failed"][0][0]], batch["failed"][0][1]
            raise ValueError(f"training image unreadable: {path}: {reason}")
        e, t = first_stage.encode_image(batch["pixels"].to(device))
        embs.append(e.float().cpu())
        toks.append(t.half().cpu())
    unique = sorted(set(data.captions))
    where = {c: i for i, c in enumerate(unique)}
    text = torch.cat([first_stage.encode_text(unique[s:s + 512]).float().cpu()
                      for s in tqdm(range(0, len(unique), 512), desc="caption features", disable=not progress)])
    feats = TrainFeatures(torch.cat(embs), torch.cat(toks), text[torch.tensor([where[c] for c in data.captions])])
    if cache is not None:
        save_checkpoint(cache, key=key, **dataclasses.asdict(feats))
    return feats

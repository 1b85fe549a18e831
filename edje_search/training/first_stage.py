"""Contrastive training of a small first-stage dual encoder (the offline default).

Image tower: an open_clip ViT trained from scratch. Text tower: the bundled MiniLM-L6
sentence model, locked (only its projection trains), so its pooled outputs are computed once
per caption and cached.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm
from transformers import AutoModel

from ..config import FirstStageConfig
from ..data.annotations import CaptionSet
from ..devices import pick_device, precision_autocast
from ..images import decode_image
from ..models.first_stage import FirstStage
from ..models.registry import bundled_minilm_dir
from .configs import FirstStageTrainConfig
from .common import load_checkpoint, make_optimizer, save_checkpoint, seed_everything
from .features import FEATURES_NAME, compute_features

logger = logging.getLogger(__name__)


def demo_first_stage(cfg: FirstStageTrainConfig, text_model_dir: Path | None = None) -> FirstStage:
    """A ViT image tower + locked MiniLM text tower, MiniLM weights loaded from disk."""
    text_dir = Path(text_model_dir) if text_model_dir else bundled_minilm_dir()
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width,
                       "layers": cfg.layers, "head_width": cfg.head_width, "mlp_ratio": 4.0},
        "text_cfg": {"hf_model_name": "bundled-minilm", "hf_tokenizer_name": "bundled-minilm",
                     "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                     "context_length": cfg.context_length},
    }
    fs_cfg = FirstStageConfig(model_cfg=model_cfg, image_size=cfg.image_size, context_length=cfg.context_length,
                              tokenizer="hf")
    model = FirstStage(fs_cfg, tokenizer_dir=text_dir)
    pretrained = AutoModel.from_pretrained(str(text_dir)).state_dict()
    # the sentence model's BERT pooler is unused by mean pooling
    model.clip.text.transformer.load_state_dict({k: v for k, v in pretrained.items() if not k.startswith("pooler.")})
    return model


def load_pixels(paths: list[Path], transform, progress: bool = True) -> torch.Tensor:
    """Decode and preprocess every image once: (N, 3, H, W) float16, kept in memory."""
    first = transform(decode_image(Path(paths[0]).read_bytes()))
    out = torch.empty((len(paths), *first.shape), dtype=torch.float16)
    for i, p in enumerate(tqdm(paths, desc="loading images", disable=not progress, unit="img")):
        out[i] = transform(decode_image(Path(p).read_bytes())).half()
    return out


@torch.no_grad()
def locked_text_features(model: FirstStage, captions: list[str], batch_size: int = 256,
                         progress: bool = True) -> torch.Tensor:
    """Pooled outputs of the locked text transformer, before the trainable projection (C, D_t).

    Run in eval mode (no dropout: these features stand for what the tower gives at query time).
    Captions go in batches of similar length, each cut to its longest caption instead of the
    tokenizer's fixed context length: a fifth fewer tokens on the demo's captions. Padding is
    masked out of attention and of the mean pool, so the features are those of full padding.
    """
    text = model.clip.text
    device = next(model.parameters()).device
    ids = model.tokenize(captions)  # (C, context_length), padded on the right
    mask = (ids != text.config.pad_token_id).long()
    order = torch.argsort(mask.sum(dim=1), stable=True)
    pooled = []
    was_training = text.training
    text.eval()
    try:
        for s in tqdm(range(0, len(captions), batch_size), desc="text features", disable=not progress):
            rows = order[s:s + batch_size]
            width = int(mask[rows].sum(dim=1).max())
            b_ids, b_mask = ids[rows, :width].to(device), mask[rows, :width].to(device)
            pooled.append(text.pooler(text.transformer(input_ids=b_ids, attention_mask=b_mask), b_mask).float().cpu())
    finally:
        text.train(was_training)
    feats = torch.empty(len(captions), pooled[0].shape[1])
    feats[order] = torch.cat(pooled)
    return feats


def train_first_stage(data: CaptionSet, out_dir: str | Path, cfg: FirstStageTrainConfig, *,
                      device: str | None = None, save_features: bool = False,
                      progress: bool = True) -> FirstStage:
    """Train on ``data`` (resuming from ``out_dir``'s checkpoint) and return the model in eval mode.

    ``save_features``: also write the trained model's features of ``data`` to ``out_dir``/features.pt
    (training/features.py), for ``train reranker --features``; the caption half comes from the
    locked text features at hand.
    """
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)
    dev = pick_device(device)
    model = demo_first_stage(cfg)
    model.clip.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    for p in model.clip.text.proj.parameters():
        p.requires_grad = True
    model.to(dev)
    unique, caption_key = np.unique(np.asarray(data.captions), return_inverse=True)
    text_feats = locked_text_features(model, unique.tolist(), progress=progress)[torch.from_numpy(caption_key)]
    pixels = load_pixels(data.images, model.preprocess, progress=progress)
    n_caps = len(data.captions)
    total = planned_steps(cfg, n_caps)
    opt, sched = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, int(cfg.warmup_fraction * total), total)
    loss_fn = ClipLoss()
    ckpt_path = out_dir / "train_state.pt"
    step = 0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        model.clip.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
    caption_image = torch.tensor(data.caption_image)
    gen = torch.Generator().manual_seed(cfg.seed)
    passes = int(np.ceil(total * cfg.batch_size / n_caps)) + 1
    order = torch.cat([torch.randperm(n_caps, generator=gen) for _ in range(passes)])
    model.train()
    recent: list[float] = []
    bar = tqdm(total=total, initial=step, desc="first stage", disable=not progress, dynamic_ncols=True)
    while step < total:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        img_idx = caption_image[idx]
        # one caption per image in a batch: duplicates would be false negatives for InfoNCE
        _, keep = np.unique(img_idx.numpy(), return_index=True)
        idx, img_idx = idx[keep], img_idx[keep]
        with precision_autocast(dev, cfg.precision):
            img_emb, _ = model.encode_image(pixels[img_idx].to(dev, torch.float32))
            txt_emb = F.normalize(model.clip.text.proj(text_feats[idx].to(dev)), dim=-1)
            loss = loss_fn(img_emb.float(), txt_emb.float(), model.clip.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, np.log(100))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        recent = (recent + [loss.item()])[-20:]
        if step % 200 == 0 or step == total:
            save_checkpoint(ckpt_path, model=model.clip.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), step=step)
    bar.close()
    warn_if_at_chance(recent, cfg.batch_size, total)
    model.eval()
    if save_features:
        with torch.no_grad():
            text_emb = torch.cat([F.normalize(model.clip.text.proj(text_feats[s:s + 4096].to(dev)), dim=-1).cpu()
                                  for s in range(0, len(text_feats), 4096)])
        compute_features(model, data, cache=out_dir / FEATURES_NAME, text_emb=text_emb, progress=progress)
    return model


def planned_steps(cfg: FirstStageTrainConfig, n_captions: int) -> int:
    """Optimizer steps of a run: ``cfg.steps``, or ``cfg.epochs`` passes of ``cfg.batch_size`` captions."""
    if (cfg.steps is None) == (cfg.epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if cfg.steps is not None:
        return cfg.steps
    return max(int(cfg.epochs * n_captions / cfg.batch_size), 1)


def warn_if_at_chance(recent_losses: list[float], batch_size: int, steps: int) -> None:
    """Warn when the contrastive loss ended near chance, ln(batch): the first stage has learnt little."""
    if not recent_losses:
        return
    chance = float(np.log(batch_size))
    final = float(np.mean(recent_losses))
    if final > 0.8 * chance:
        logger.warning("first stage: the loss ended at %.2f, near chance (ln %d = %.2f) after %d steps; it has "
                       "learnt little: train for more steps (--steps)", final, batch_size, chance, steps)

"""EDJE training objectives (docs/architecture.md): ITM, MLM, text-embedding recovery, distillation,
and two additions of this project: a pointwise match loss and the swapped-caption negatives of
caption_swaps.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def itm_loss(pos: torch.Tensor, neg_image: torch.Tensor, neg_caption: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy (positive vs its hard negative), averaged over both directions.

    All inputs are (B,) logits: s(caption_i, image_i), s(caption_i, neg image), s(neg caption, image_i).
    """
    target = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    t2i = F.cross_entropy(torch.stack([pos, neg_image], dim=1), target)
    i2t = F.cross_entropy(torch.stack([pos, neg_caption], dim=1), target)
    return (t2i + i2t) / 2


def match_loss(pos: torch.Tensor, neg_image: torch.Tensor, neg_caption: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each pair on its own: positives towards 1, both hard negatives
    towards 0 (all (B,) logits, the same pairs :func:`itm_loss` compares).

    :func:`itm_loss` sees only the difference between a positive and its negative, so it leaves
    the level of the logits free to drift from caption to caption; this term pins it, so a logit
    (and a calibrated probability) means the same for every query and a cutoff can be shared.
    """
    logits = torch.cat([pos, neg_image, neg_caption]).float()
    target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg_image), torch.zeros_like(neg_caption)]).float()
    # each positive weighs as much as its two negatives together
    weight = torch.cat([torch.full_like(pos, 2.0), torch.ones_like(neg_image), torch.ones_like(neg_caption)]).float()
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight) * 3 / 4


def swap_loss(pos: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each caption against its word-swapped copy, both on the caption's own
    image ((S,) logits each): the matching pair must win."""
    target = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    return F.cross_entropy(torch.stack([pos, swapped], dim=1), target)


def mask_caption_tokens(input_ids: torch.Tensor, token_type_ids: torch.Tensor, special_mask: torch.Tensor,
                        mask_token_id: int, probability: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace caption tokens by [MASK] with ``probability``; never special or image tokens.

    Returns (masked input_ids, labels) with labels = -100 where nothing was masked.
    """
    candidates = (token_type_ids == 0) & ~special_mask.bool()
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    masked = candidates & (draw < probability)
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    return input_ids.masked_fill(masked, mask_token_id), labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the masked positions only ((N, V) logits, (N,) labels)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def recovery_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the recovered and the first-stage text embeddings, averaged."""
    return (1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1)).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCE of the student's logits against the teacher's sigmoid probabilities."""
    return F.binary_cross_entropy_with_logits(student_logits.float(), torch.sigmoid(teacher_logits.float()))

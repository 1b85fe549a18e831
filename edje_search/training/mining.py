"""Hard-negative mining by first-stage similarity (both directions)."""
from __future__ import annotations

import torch


def mine_hard_negatives(text_emb: torch.Tensor, image_emb: torch.Tensor, image_ids: torch.Tensor,
                        caption_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, for each pair of a batch, the hardest negative image and the hardest negative caption.

    ``text_emb`` (B, E) and ``image_emb`` (B, E) are the first-stage embeddings of the batch's
    captions and images (pair i = caption i with image i); ``image_ids`` (B,) group images that
    count as the same (never picked as each other's negatives); ``caption_keys`` (B,), when
    given, also rules out pairs whose captions are identical strings.

    Returns ``neg_image`` (B,): batch index of the most similar other image for caption i, and
    ``neg_caption`` (B,): batch index of the most similar other caption for image i.
    """
    sim = text_emb.float() @ image_emb.float().T  # (B captions, B images)
    same = image_ids[:, None] == image_ids[None, :]
    if caption_keys is not None:
        same |= caption_keys[:, None] == caption_keys[None, :]
    if bool(same.all(dim=1).any()):
        raise ValueError("a batch needs at least two distinct images to mine negatives")
    sim = sim.masked_fill(same, float("-inf"))
    neg_image = sim.argmax(dim=1)  # caption i -> hardest other image
    neg_caption = sim.argmax(dim=0)  # image j -> hardest other caption
    return neg_image, neg_caption

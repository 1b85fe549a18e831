"""Hard-negative mining by first-stage similarity (both directions)."""
from __future__ import annotations

import numpy as np
import torch


def match_groups(image_ids: list[str], caption_image: list[int], captions: list[str]) -> np.ndarray:
    """(N,) group of each image: images that share an id or any identical caption are one group.

    Two images described by the same sentence both match it, so neither may serve as the
    other's negative. Generated scenes repeat sentences often, web captions rarely; the rule is
    the same for both (strings compared after lower-casing and collapsing whitespace).
    """
    parent = list(range(len(image_ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, str], int] = {}
    keys = [("id", i) for i in image_ids]
    keys += [("caption", " ".join(c.lower().split())) for c in captions]
    images = list(range(len(image_ids))) + list(caption_image)
    for key, img in zip(keys, images):
        other = first_with.setdefault(key, img)
        a, b = find(img), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.unique([find(i) for i in range(len(image_ids))], return_inverse=True)[1]


def mine_hard_negatives(text_emb: torch.Tensor, image_emb: torch.Tensor, groups: torch.Tensor,
                        pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, for each pair of a batch, the hardest negative image and the hardest negative caption.

    ``text_emb`` (B, E) and ``image_emb`` (B, E) are the first-stage embeddings of the batch's
    captions and images (pair i = caption i with image i); ``groups`` (B,) says which images
    count as the same (never picked as each other's negatives, see :func:`match_groups`).
    Candidates come from ``pool`` = (text_emb, image_emb, groups) of P pairs, by default the
    batch itself; a pool larger than the batch gives harder negatives at no extra encoder cost.

    Returns ``neg_image`` (B,): pool index of the most similar other image for caption i, and
    ``neg_caption`` (B,): pool index of the most similar other caption for image i.
    """
    pool_text, pool_image, pool_groups = pool if pool is not None else (text_emb, image_emb, groups)
    same = groups[:, None] == pool_groups[None, :]  # (B, P)
    if bool(same.all(dim=1).any()):
        raise ValueError("a batch needs at least two distinct images to mine negatives")
    to_images = (text_emb.float() @ pool_image.float().T).masked_fill(same, float("-inf"))
    to_captions = (image_emb.float() @ pool_text.float().T).masked_fill(same, float("-inf"))
    return to_images.argmax(dim=1), to_captions.argmax(dim=1)

"""Which (caption, image) pairs go into each training step.

Hard negatives are mined inside the (gathered) batch, so a batch of random images only offers
easy negatives: at test time the reranker sorts the first stage's top-k, images the first stage
already finds similar. ``neighbour_group > 1`` builds each batch from groups of such images: a
random seed caption, then images its first-stage neighbours, each with one of its captions.
"""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def first_stage_neighbours(text_emb: torch.Tensor, image_emb: torch.Tensor, k: int,
                           chunk: int = 2048) -> np.ndarray:
    """(C, k) indices of the ``k`` images most similar to each caption by first-stage similarity."""
    k = min(k, image_emb.shape[0])
    out = [torch.topk(text_emb[s:s + chunk].float() @ image_emb.float().T, k, dim=1).indices
           for s in range(0, text_emb.shape[0], chunk)]
    return torch.cat(out).numpy()


class PairBatches:
    """Caption indices per step, at most one caption per image, identical on every process (seeded)."""

    def __init__(self, caption_image: np.ndarray, size: int, seed: int, *,
                 neighbours: np.ndarray | None = None, group: int = 1):
        if group > 1 and neighbours is None:
            raise ValueError("neighbour groups need first-stage neighbours")
        self.caption_image = np.asarray(caption_image)
        self.size = size
        self.group = group
        self.neighbours = neighbours
        self.rng = np.random.default_rng(seed)
        self.queue: list[int] = []
        order = np.argsort(self.caption_image, kind="stable")
        bounds = np.searchsorted(self.caption_image[order], np.arange(self.caption_image.max() + 2))
        self.image_captions = [order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]

    def next(self) -> np.ndarray:
        out: list[int] = []
        seen: set[int] = set()
        while len(out) < self.size:
            if not self.queue:
                self.queue = self.rng.permutation(len(self.caption_image)).tolist()
            c = self.queue.pop()
            if self.caption_image[c] in seen:
                continue
            seen.add(int(self.caption_image[c]))
            out.append(c)
            if self.group > 1:
                self._add_neighbours(c, out, seen)
        return np.array(out)

    def _add_neighbours(self, c: int, out: list[int], seen: set[int]) -> None:
        added = 1
        for j in self.neighbours[c]:
            if added == self.group or len(out) == self.size:
                return
            j = int(j)
            if j in seen or len(self.image_captions[j]) == 0:
                continue
            caps = self.image_captions[j]
            out.append(int(caps[self.rng.integers(len(caps))]))
            seen.add(j)
            added += 1

"""Caption-word warm-up of a fresh adapter, before the joint encoder trains.

A freshly initialised adapter hands the joint encoder tokens that look like nothing it has
read: its attention queries start almost uniform, so all m compressed tokens are nearly the
same average of the image, and matching (ITM) sits at chance until the adapter and the
language model have found each other, a hundred steps or more on a CPU. This warm-up trains
the adapter alone, without a joint-encoder pass, to emit tokens close to the word embeddings
of its image's caption words (any token may explain a word: the m token scores are pooled with
log-sum-exp), then scales them to the word embeddings' norm. The joint encoder then starts from
image tokens that read like the words describing the image. It needs only cached vision tokens
and the captions, and costs a few seconds to a minute on a CPU.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..models.reranker import Reranker

logger = logging.getLogger(__name__)


def caption_word_targets(tokenizer, captions: list[str], max_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max_vocab`` most frequent word pieces of ``captions`` (V,) and a multi-hot (C, V) per caption."""
    ids = tokenizer([str(c) for c in captions], add_special_tokens=False)["input_ids"]
    counts: dict[int, int] = {}
    for seq in ids:
        for w in set(seq):
            counts[w] = counts.get(w, 0) + 1
    vocab = sorted(counts, key=lambda w: (-counts[w], w))[:max_vocab]
    where = {w: i for i, w in enumerate(vocab)}
    targets = torch.zeros(len(captions), len(vocab))
    for c, seq in enumerate(ids):
        cols = [where[w] for w in seq if w in where]
        targets[c, cols] = 1.0
    return torch.tensor(vocab), targets


def warm_up_adapter(reranker: Reranker, vision_tokens: torch.Tensor, captions: list[str],
                    caption_image: np.ndarray, *, steps: int, lr: float = 1e-3, batch_size: int = 256,
                    max_vocab: int = 4096, temperature: float = 0.1, seed: int = 0) -> list[float]:
    """Train ``reranker``'s adapter so its tokens predict their caption's word pieces; returns the losses.

    ``vision_tokens`` (N, n, D_v) are the cached vision-encoder tokens of the training images,
    ``caption_image`` (C,) the image of each caption. Only the adapter's parameters change.
    """
    if steps <= 0:
        return []
    dev = reranker.device
    embeddings = reranker.language_model.bert.embeddings.word_embeddings.weight.detach()  # (V_all, H)
    vocab, targets = caption_word_targets(reranker.tokenizer, captions, max_vocab)
    words = F.normalize(embeddings[vocab.to(dev)], dim=-1)  # (V, H)
    caption_image = torch.as_tensor(np.asarray(caption_image))
    adapter = reranker.vision_projection
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        caps = torch.from_numpy(rng.integers(0, len(captions), batch_size))
        tokens = reranker.project(vision_tokens[caption_image[caps]].to(dev).float())  # (B, m, H)
        logits = F.normalize(tokens, dim=-1) @ words.T / temperature  # (B, m, V)
        pooled = torch.logsumexp(logits, dim=1)  # (B, V): whichever token fits a word best explains it
        y = targets[caps].to(dev)  # (B, V)
        loss = -(F.log_softmax(pooled, dim=-1) * y).sum(-1).div(y.sum(-1).clamp(min=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():  # the joint encoder adds position embeddings to these: match the word-embedding norm
        sample = vision_tokens[:min(512, len(vision_tokens))].to(dev).float()
        scale = embeddings.norm(dim=-1).mean() / reranker.project(sample).norm(dim=-1).mean()
        last = _last_linear(adapter)
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    logger.info("adapter warm-up: %d steps, caption-word loss %.3f -> %.3f over %d word pieces",
                steps, losses[0], float(np.mean(losses[-10:])), len(vocab))
    return losses


def _last_linear(adapter: torch.nn.Module) -> torch.nn.Linear:
    """The adapter's output projection (compressed: ``projection``; local: the Sequential's last layer)."""
    last = getattr(adapter, "projection", None)
    if last is None:
        last = [m for m in adapter.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last

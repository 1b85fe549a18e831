"""Validation recall while a reranker trains (``train reranker --auto``).

The validation split is either given (``--val-data``) or carved from the training images (whole
images, every caption of an image on one side). Each query is ranked against the whole
validation gallery by the frozen first stage, its top ``rerank_k`` reordered by the joint
encoder's logit and scored with :class:`edje_search.evaluation.RerankedSet`, the ranking rule
and Recall@K of the ``eval`` command. The stored tokens are what an index would serve: the
adapter's projection of the cached first-stage vision tokens through a float16 store round trip
(:func:`edje_search.evaluation.served_tokens`), scored through ``Reranker.score_pairs``.

To keep a validation cheap on a large gallery, the queries can be a random subset of the
gallery's images (i2t) and their captions (t2i): each is still ranked against every image or
caption, so the recall estimates the full split's without the small-gallery bias.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..data.annotations import CaptionSet
from ..evaluation import (EncodedSet, RerankedSet, first_correct_rank, first_stage_rankings, pair_scorer,
                          recall_at_k, served_tokens, top_pairs)
from ..models.bundle import EdjeModel
from ..models.first_stage import FirstStage
from ..models.reranker import Reranker
from .features import TrainFeatures


def subset(data: CaptionSet, images: np.ndarray) -> CaptionSet:
    """The images ``images`` (indices into ``data``) with all their captions, in that order."""
    per_image = data.image_captions
    captions, caption_image = [], []
    for new, old in enumerate(images.tolist()):
        for c in per_image[old]:
            captions.append(data.captions[c])
            caption_image.append(new)
    return CaptionSet([data.images[i] for i in images.tolist()], captions, caption_image,
                      [data.image_ids[i] for i in images.tolist()])


def subset_features(feats: TrainFeatures, data: CaptionSet, images: np.ndarray) -> TrainFeatures:
    """``feats`` of ``data`` restricted to ``images``, in the caption order :func:`subset` gives."""
    per_image = data.image_captions
    caps = torch.tensor([c for i in images.tolist() for c in per_image[i]], dtype=torch.long)
    idx = torch.from_numpy(np.asarray(images, dtype=np.int64))
    return TrainFeatures(feats.image_emb[idx], feats.vision_tokens[idx], feats.text_emb[caps])


def carve(data: CaptionSet, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training images, validation images): ``n_val`` images drawn at random, sorted; the rest train.

    Images that share an id go to the same side (their captions describe one picture).
    """
    ids = np.asarray(data.image_ids)
    unique = np.unique(ids)
    rng = np.random.default_rng([seed, 30])
    chosen, count = set(), 0
    sizes = {u: int(n) for u, n in zip(*np.unique(ids, return_counts=True))}
    for u in rng.permutation(unique).tolist():
        if count >= n_val:
            break
        chosen.add(u)
        count += sizes[u]
    held = np.isin(ids, list(chosen))
    return np.flatnonzero(~held), np.flatnonzero(held)


def validation_size(n_images: int, wanted: int) -> int:
    """Validation images to carve from ``n_images`` training images: ``wanted``, at most a tenth,
    at least 2 (one image cannot be ranked)."""
    return max(2, min(wanted, n_images // 10))


@dataclasses.dataclass
class ValidationSet:
    data: CaptionSet
    feats: TrainFeatures
    rerank_k: int
    queries: dict[str, np.ndarray]  # the caption (t2i) or image (i2t) of each query row
    orders: dict[str, np.ndarray]  # first-stage order of each query over the whole gallery
    first: dict[str, np.ndarray]
    targets: dict[str, list[set[int]]]
    first_stage: dict[str, dict[str, float]]  # the first stage's Recall@K on the same queries

    @property
    def n_queries(self) -> dict[str, int]:
        return {d: len(t) for d, t in self.targets.items()}


def make_validation_set(data: CaptionSet, feats: TrainFeatures, *, rerank_k: int, n_queries: int,
                        seed: int) -> ValidationSet:
    """First-stage rankings of ``data`` (the whole gallery) for up to ``n_queries`` query images
    (i2t) and their captions (t2i)."""
    enc = EncodedSet(feats.image_emb.float(), feats.text_emb.float(), [], "float16")
    orders, first, targets = first_stage_rankings(enc, data)
    n = len(data.images)
    pick = np.arange(n) if n_queries >= n else np.sort(np.random.default_rng([seed, 31]).choice(n, n_queries,
                                                                                                   replace=False))
    per_image = data.image_captions
    rows = {"t2i": np.asarray([c for i in pick.tolist() for c in per_image[i]], dtype=np.int64), "i2t": pick}
    orders = {d: orders[d][rows[d]] for d in rows}
    first = {d: first[d][rows[d]] for d in rows}
    targets = {d: [targets[d][r] for r in rows[d].tolist()] for d in rows}
    first_stage = {d: recall_at_k(first_correct_rank(orders[d], targets[d])) for d in rows}
    return ValidationSet(data, feats, rerank_k, rows, orders, first, targets, first_stage)


@torch.no_grad()
def stored_tokens(reranker: Reranker, vision_tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """The tokens an index of this reranker would serve for these first-stage vision tokens (float16 store)."""
    dev = next(reranker.parameters()).device
    out = [reranker.project(vision_tokens[s:s + batch_size].to(dev).float()).float().cpu().numpy()
           for s in range(0, len(vision_tokens), batch_size)]
    return torch.from_numpy(served_tokens(np.concatenate(out), "float16"))


@torch.no_grad()
def validate(first_stage: FirstStage, reranker: Reranker, vs: ValidationSet, *, batch_size: int = 128,
             precision: str = "auto") -> dict[str, dict[str, float]]:
    """Recall@K of the joint encoder alone (fusion weight 0) on the validation queries, per direction."""
    was_training = reranker.training
    reranker.eval()
    try:
        tokens = stored_tokens(reranker, vs.feats.vision_tokens)
        model = EdjeModel(first_stage, reranker, name="validation")
        n_images = len(vs.data.images)
        rows_t2i, imgs_t2i, shape_t2i = top_pairs(vs.orders["t2i"], vs.rerank_k)
        rows_i2t, caps_i2t, shape_i2t = top_pairs(vs.orders["i2t"], vs.rerank_k)
        # query rows are a subset: row r asks for caption (t2i) or image (i2t) queries[d][r]
        caps_t2i, imgs_i2t = vs.queries["t2i"][rows_t2i], vs.queries["i2t"][rows_i2t]
        # a pair in both directions' top k is scored once (as evaluation.rerank_set does)
        caps, imgs = np.concatenate([caps_t2i, caps_i2t]), np.concatenate([imgs_t2i, imgs_i2t])
        pairs, where = np.unique(caps * n_images + imgs, return_inverse=True)
        score = pair_scorer(model, vs.data.captions, tokens, captions_are_queries=True, batch_size=batch_size,
                            precision=precision, progress=False)
        flat = np.asarray(score(pairs // n_images, pairs % n_images))[where.reshape(-1)]
        scores = {"t2i": flat[:len(caps_t2i)].reshape(shape_t2i), "i2t": flat[len(caps_t2i):].reshape(shape_i2t)}
        ranked = RerankedSet(vs.orders, vs.first, scores, vs.targets)
        return {d: ranked.recall(d) for d in ("t2i", "i2t")}
    finally:
        reranker.train(was_training)

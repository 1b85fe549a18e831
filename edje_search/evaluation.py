"""Retrieval evaluation: Recall@K for the first stage alone and after reranking its top-k.

Text-to-image: each caption's target is its image. Image-to-text: an image is found at the
best rank of any of its captions. Reranking reorders the first stage's top ``rerank_k``
candidates by the rule of :mod:`edje_search.ranking` (joint-encoder logit plus
``fusion_weight`` x first-stage similarity); candidates below keep their first-stage order.

Evaluation scores what search serves: images go through the indexing stage
(:func:`edje_search.pipeline.embed_files`), their tokens through the round trip of a token
store of the chosen dtype (float16 by default, as ``build-index`` stores them; ``float32``
for comparison, ``int8`` as ``--token-precision int8``), and pairs through
:meth:`Reranker.score_pairs`, the engine's own scoring path.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .calibration import Calibration, fit_platt, sigmoid
from .config import DEFAULT_RERANK_K
from .data.annotations import CaptionSet
from .devices import precision_autocast
from .errors import BadInput
from .models.bundle import EdjeModel
from .pipeline import embed_files
from .ranking import rerank_order
from .storage.token_store import TOKEN_DTYPES, dequantize, quantize_per_token, working_dtype

__all__ = [
    "EncodedSet", "RerankedSet", "calibrate_fusion", "calibration_pairs", "encode_set", "evaluate",
    "first_correct_rank", "first_stage_rankings", "fit_probability", "format_table", "load_eval_set", "pair_scorer",
    "recall_at_k", "rerank_order", "rerank_scores", "rerank_set", "served_tokens", "top_pairs",
]

KS = (1, 5, 10)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Zero-based ranks of the first correct item -> {"R@k": percent}."""
    ranks = np.asarray(ranks)
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def first_correct_rank(order: np.ndarray, targets: Sequence[set[int]]) -> np.ndarray:
    """(Q, N) candidate order per query and each query's correct set -> rank of the first hit."""
    ranks = np.full(len(targets), order.shape[1], dtype=np.int64)
    for q, tgt in enumerate(targets):
        hit = np.flatnonzero(np.isin(order[q], list(tgt)))
        if hit.size:
            ranks[q] = hit[0]
    return ranks


def top_pairs(order: np.ndarray, rerank_k: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(query index, item index) of each row's first ``rerank_k`` entries, flat, and their (Q, k) shape."""
    k = min(rerank_k, order.shape[1])
    return np.repeat(np.arange(order.shape[0]), k), order[:, :k].reshape(-1), (order.shape[0], k)


def rerank_scores(order: np.ndarray, rerank_k: int,
                  score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``score_pairs(query_idx, item_idx)`` of each row's first ``rerank_k`` entries, as (Q, k)."""
    q_idx, item_idx, shape = top_pairs(order, rerank_k)
    return np.asarray(score_pairs(q_idx, item_idx)).reshape(shape)


def served_tokens(tokens: np.ndarray, token_dtype: str) -> np.ndarray:
    """Projected tokens (..., m, d) -> what a token store of ``token_dtype`` gives back for them
    (float32): the cast the indexing stage applies, then the store's own quantisation."""
    if token_dtype not in TOKEN_DTYPES:
        raise BadInput(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, not {token_dtype!r}")
    x = np.asarray(tokens).astype(working_dtype(token_dtype))
    if token_dtype == "int8":
        return dequantize(*quantize_per_token(x))
    return x.astype(np.float32)


@dataclasses.dataclass
class EncodedSet:
    image_emb: torch.Tensor  # (N, E) float32, normalised
    text_emb: torch.Tensor  # (C, E) float32, normalised
    tokens: list[torch.Tensor]  # per model: (N, m, D_lm) float32, as read back from the token store
    token_dtype: str


@torch.no_grad()
def encode_set(models: EdjeModel | Sequence[EdjeModel], data: CaptionSet, *, token_dtype: str = "float16",
               batch_size: int = 64, num_workers: int = 1, progress: bool = True) -> EncodedSet:
    """Embed a labelled set as ``build-index`` would: first-stage vectors from the first model,
    each model's stored tokens (through a ``token_dtype`` store round trip), caption embeddings.

    Each model runs the indexing stage itself, so its tokens are exactly what its index holds.
    """
    models = [models] if isinstance(models, EdjeModel) else list(models)
    paths = [str(p) for p in data.images]
    image_emb, tokens = None, []
    for model in models:
        vectors, toks, done = [], [], []
        for batch in embed_files(model, paths, batch_size=batch_size, num_workers=num_workers,
                                 token_dtype=working_dtype(token_dtype), progress=progress):
            if batch.failed:
                path, reason = batch.failed[0]
                raise BadInput(f"unreadable image: {path}: {reason}")
            done += batch.paths
            vectors.append(batch.vectors)
            toks.append(served_tokens(batch.tokens, token_dtype))
        if done != paths:
            raise BadInput("the evaluation set lists an image twice or in a form the indexer changes")
        image_emb = torch.from_numpy(np.concatenate(vectors)) if image_emb is None else image_emb
        tokens.append(torch.from_numpy(np.concatenate(toks)))
    base = models[0]
    texts = [base.embed_texts(data.captions[s:s + 256]).cpu() for s in range(0, len(data.captions), 256)]
    return EncodedSet(image_emb, torch.cat(texts), tokens, token_dtype)


def pair_scorer(model: EdjeModel, captions: list[str], tokens: torch.Tensor, *, captions_are_queries: bool,
                batch_size: int = 128, precision: str = "auto", progress: bool = True):
    """A ``score_pairs(query_idx, item_idx)`` callable over a caption list and stored tokens (N, m, d),
    scoring through :meth:`Reranker.score_pairs` (the engine's path)."""
    def score(q_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        cap_idx, img_idx = (q_idx, item_idx) if captions_are_queries else (item_idx, q_idx)
        with precision_autocast(model.device, precision):
            return model.reranker.score_pairs(captions, tokens, cap_idx, img_idx, batch_size=batch_size,
                                              progress=progress)
    return score


@dataclasses.dataclass
class RerankedSet:
    """One model's joint-encoder scores of the first stage's top-k, both directions."""

    orders: dict[str, np.ndarray]  # "t2i" (C, N) / "i2t" (N, C) first-stage order
    first: dict[str, np.ndarray]  # first-stage similarity of the same entries
    scores: dict[str, np.ndarray]  # (Q, k) joint-encoder logits of the first k entries
    targets: dict[str, list[set[int]]]

    def order(self, direction: str, fusion_weight: float = 0.0) -> np.ndarray:
        """Final candidate order per query (Q, N), as search would list it."""
        return rerank_order(self.orders[direction], self.scores[direction], self.first[direction], fusion_weight)

    def recall(self, direction: str, fusion_weight: float = 0.0) -> dict[str, float]:
        return recall_at_k(first_correct_rank(self.order(direction, fusion_weight), self.targets[direction]))


def first_stage_rankings(enc: EncodedSet, data: CaptionSet) -> tuple[dict, dict, dict]:
    """First-stage order, similarity of each ordered entry and correct sets, per direction ("t2i", "i2t")."""
    sims = (enc.text_emb @ enc.image_emb.T).numpy()  # (C, N)
    orders = {"t2i": np.argsort(-sims, axis=1, kind="stable"), "i2t": np.argsort(-sims.T, axis=1, kind="stable")}
    first = {"t2i": np.take_along_axis(sims, orders["t2i"], axis=1),
             "i2t": np.take_along_axis(sims.T, orders["i2t"], axis=1)}
    targets = {"t2i": [{i} for i in data.caption_image], "i2t": [set(c) for c in data.image_captions]}
    return orders, first, targets


def rerank_set(model: EdjeModel, data: CaptionSet, enc: EncodedSet, tokens: torch.Tensor, *,
               rerank_k: int = DEFAULT_RERANK_K,
               precision: str = "auto", batch_size: int = 128, progress: bool = True) -> RerankedSet:
    """Score each direction's first-stage top ``rerank_k`` with ``model`` over its stored ``tokens``.

    A (caption, image) pair in both directions' top k is scored once: on the demo's 1,000 test
    images at rerank_k=10, 20,622 pairs instead of 30,000.
    """
    orders, first, targets = first_stage_rankings(enc, data)
    n_images = len(data.images)
    captions_t2i, images_t2i, shape_t2i = top_pairs(orders["t2i"], rerank_k)
    images_i2t, captions_i2t, shape_i2t = top_pairs(orders["i2t"], rerank_k)
    caps, imgs = np.concatenate([captions_t2i, captions_i2t]), np.concatenate([images_t2i, images_i2t])
    pairs, where = np.unique(caps * n_images + imgs, return_inverse=True)
    score = pair_scorer(model, data.captions, tokens, captions_are_queries=True, batch_size=batch_size,
                        precision=precision, progress=progress)
    flat = np.asarray(score(pairs // n_images, pairs % n_images))[where.reshape(-1)]
    scores = {"t2i": flat[:len(captions_t2i)].reshape(shape_t2i), "i2t": flat[len(captions_t2i):].reshape(shape_i2t)}
    return RerankedSet(orders, first, scores, targets)


def evaluate(models: Sequence[EdjeModel], data: CaptionSet, *, rerank_k: int = DEFAULT_RERANK_K,
             precision: str = "auto",
             batch_size: int = 128, token_dtype: str = "float16", progress: bool = True) -> dict:
    """Recall table for the first stage of ``models[0]`` and for each model's reranker.

    All models must share the first stage (as a teacher and its student do). A model with a
    fusion weight gets two rows: the joint encoder alone, then fused with the first stage.
    Tokens are scored as an index of ``token_dtype`` serves them (``"float32"`` for reference).
    """
    base = models[0]
    for model in models:
        if model.first_stage.config != base.first_stage.config:
            raise BadInput("evaluated rerankers must share the first stage")
    enc = encode_set(models, data, token_dtype=token_dtype, progress=progress)
    orders, _, targets = first_stage_rankings(enc, data)
    results = {"n_images": len(data.images), "n_captions": len(data.captions), "rerank_k": rerank_k,
               "token_dtype": token_dtype,
               "rows": [{"name": "first stage", "variant": "embedding",
                         "t2i": recall_at_k(first_correct_rank(orders["t2i"], targets["t2i"])),
                         "i2t": recall_at_k(first_correct_rank(orders["i2t"], targets["i2t"]))}]}
    for model, tokens in zip(models, enc.tokens):
        ranked = rerank_set(model, data, enc, tokens, rerank_k=rerank_k, precision=precision, batch_size=batch_size,
                            progress=progress)
        cfg = model.reranker.config
        for w in sorted({0.0, model.fusion_weight}):
            results["rows"].append({
                "name": model.name + (f" + first stage x{w:g}" if w else ""), "variant": cfg.variant,
                "tokens_per_image": cfg.tokens_per_image, "fusion_weight": w,
                "backend": model.reranker.backend,
                "model": str(model.path) if model.path else None,
                "t2i": ranked.recall("t2i", w), "i2t": ranked.recall("i2t", w),
            })
    return results


FUSION_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)


def calibrate_fusion(model: EdjeModel, data: CaptionSet, *, rerank_k: int = DEFAULT_RERANK_K,
                     weights: Sequence[float] = FUSION_GRID, fusion: bool = True, probability: bool = False,
                     batch_size: int = 128, token_dtype: str = "float16", progress: bool = True) -> dict:
    """What ``edje-search calibrate`` fits on a validation split, from one scoring pass.

    ``fusion``: R@1 for each candidate fusion weight; picks the best mean of both directions
    (each weight only reorders the scores; ties go to the smaller weight). ``probability``: the
    Platt scaling of the logit into a match probability (:func:`fit_probability`), under
    ``"calibration"``.
    """
    enc = encode_set(model, data, token_dtype=token_dtype, progress=progress)
    ranked = rerank_set(model, data, enc, enc.tokens[0], rerank_k=rerank_k, batch_size=batch_size,
                        progress=progress)
    first = {d: recall_at_k(first_correct_rank(ranked.orders[d], ranked.targets[d])) for d in ("t2i", "i2t")}
    result = {"n_images": len(data.images), "n_captions": len(data.captions), "rerank_k": rerank_k,
              "first_stage": first, "rows": [], "best": None}
    if fusion:
        rows = [{"fusion_weight": float(w), "t2i": ranked.recall("t2i", w), "i2t": ranked.recall("i2t", w)}
                for w in sorted(set(weights))]
        best = max(rows, key=lambda r: (r["t2i"]["R@1"] + r["i2t"]["R@1"], -r["fusion_weight"]))
        result.update(rows=rows, best=best["fusion_weight"])
    if probability:
        result["calibration"] = fit_probability(model, data, enc, ranked, batch_size=batch_size, progress=progress)
    return result


def calibration_pairs(model: EdjeModel, data: CaptionSet, enc: EncodedSet, ranked: RerankedSet, *,
                      batch_size: int = 128, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the pairs a search cutoff faces: each caption with its own image (a
    match, scored even when the first stage did not bring it into the top k) and with every
    other image of its reranked first-stage top k (the hard non-matches)."""
    target = np.asarray(data.caption_image, dtype=np.int64)
    scores = ranked.scores["t2i"]
    top = ranked.orders["t2i"][:, :scores.shape[1]]
    labels = top == target[:, None]
    logits, flags = [scores.reshape(-1)], [labels.reshape(-1)]
    missing = np.flatnonzero(~labels.any(axis=1))
    if len(missing):
        score = pair_scorer(model, data.captions, enc.tokens[0], captions_are_queries=True, batch_size=batch_size,
                            progress=progress)
        logits.append(np.asarray(score(missing, target[missing])))
        flags.append(np.ones(len(missing), dtype=bool))
    return np.concatenate(logits).astype(np.float64), np.concatenate(flags)


def fit_probability(model: EdjeModel, data: CaptionSet, enc: EncodedSet, ranked: RerankedSet, *,
                    batch_size: int = 128, progress: bool = True) -> dict:
    """Platt scaling fitted on :func:`calibration_pairs`: the Calibration's fields, and the mean
    log loss of its probabilities beside that of sigmoid(logit) on the same pairs."""
    logits, labels = calibration_pairs(model, data, enc, ranked, batch_size=batch_size, progress=progress)
    a, b = fit_platt(logits, labels)
    cal = Calibration(a, b, positives=int(labels.sum()), negatives=int((~labels).sum()),
                      rerank_k=int(ranked.scores["t2i"].shape[1]))

    def log_loss(p: np.ndarray) -> float:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return float(-np.mean(np.where(labels, np.log(p), np.log(1 - p))))

    return {**cal.to_dict(), "log_loss": log_loss(cal.prob(logits)), "log_loss_sigmoid": log_loss(sigmoid(logits))}


def format_table(results: dict) -> str:
    head = f"{'model':<36} {'variant':<11} {'m':>4} | " + " ".join(f"t2i {k:>4}" for k in ("R@1", "R@5", "R@10")) \
        + " | " + " ".join(f"i2t {k:>4}" for k in ("R@1", "R@5", "R@10"))
    lines = [f"{results['n_images']} images, {results['n_captions']} captions, rerank_k={results['rerank_k']}"
             + (f", {results['token_dtype']} tokens" if results.get("token_dtype") else ""),
             head, "-" * len(head)]
    for row in results["rows"]:
        m = row.get("tokens_per_image", "")
        lines.append(f"{row['name'][:36]:<36} {row['variant']:<11} {m!s:>4} | "
                     + " ".join(f"{row['t2i'][k]:8.1f}" for k in ("R@1", "R@5", "R@10")) + " | "
                     + " ".join(f"{row['i2t'][k]:8.1f}" for k in ("R@1", "R@5", "R@10")))
    return "\n".join(lines)


def load_eval_set(annotation_file: str | Path, image_root: str | Path | None = None) -> CaptionSet:
    from .data.annotations import read_captions

    data = read_captions(annotation_file, image_root)
    if not data.images:
        raise BadInput(f"{annotation_file}: no usable entries")
    return data

"""The match probability of a reranked hit: the joint encoder's logit through a calibration.

The reranker is trained to tell matching (caption, image) pairs from non-matching ones, but its
logit is a ranking score, not a probability: ``sigmoid(logit)`` orders pairs correctly and says
little about how likely a match is. ``edje-search calibrate`` fits Platt scaling on a labelled
split, ``prob = sigmoid(a * logit + b)`` (a logistic regression of match / non-match on the
logit), over the pairs a search cutoff faces: each caption with its own image (matches) and with
the other first-stage candidates it reranks (hard non-matches). The fit is stored with the model
(``edje.json``, beside the fusion weight; not part of the fingerprint). Without one,
``prob = sigmoid(logit)``: uncalibrated, right in its order, not in its value.

Numpy only, so commands that read ``edje.json`` need no torch.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Calibration", "fit_platt", "match_probability", "sigmoid"]


def sigmoid(x) -> np.ndarray:
    """1 / (1 + exp(-x)) in float64, without overflow warnings at large |x|."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Platt scaling of joint-encoder logits: ``prob = sigmoid(a * logit + b)``.

    ``positives``/``negatives``: the labelled pairs it was fitted on; ``rerank_k``: the first-stage
    candidates per caption those negatives came from (the prior of a match among them is about
    1 / rerank_k); ``data``: the split, as given to ``calibrate``."""

    a: float
    b: float
    method: str = "platt"
    positives: int = 0
    negatives: int = 0
    rerank_k: int = 0
    data: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError(f"calibration needs finite a and b (got a={self.a}, b={self.b})")

    def prob(self, logits) -> np.ndarray:
        return sigmoid(self.a * np.asarray(logits, dtype=np.float64) + self.b)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration | None":
        if not d:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def match_probability(logits, calibration: Calibration | None) -> np.ndarray:
    """Calibrated probabilities of ``logits`` (float64, same shape), or ``sigmoid(logit)`` without one."""
    return calibration.prob(logits) if calibration is not None else sigmoid(logits)


def fit_platt(logits, labels, *, max_iter: int = 100, tol: float = 1e-10) -> tuple[float, float]:
    """(a, b) of the logistic regression ``P(label = 1 | x) = sigmoid(a x + b)``, by Newton's method.

    Targets are Platt's smoothed labels, (N+ + 1) / (N+ + 2) for matches and 1 / (N- + 2) for
    non-matches, so perfectly separated scores give a finite fit (a steep one) instead of
    diverging; with thousands of pairs they differ from 0/1 by well under 1%.

    Hand-written because no dependency offers it: scikit-learn (whose LogisticRegression would do
    the regression, not Platt's targets) is not installed, and two parameters need no more than a
    2 x 2 Newton step.
    """
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} logits but {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"calibration needs matching and non-matching pairs (got {n_pos} and {n_neg})")
    if not np.isfinite(x).all():
        raise ValueError("calibration logits must be finite")
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 0.0, math.log((n_pos + 1.0) / (n_neg + 1.0))
    loss = _loss(x, t, a, b)
    for _ in range(max_iter):
        p = sigmoid(a * x + b)
        w = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.dot(p - t, x), np.sum(p - t)])
        h = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), w.sum()]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(h, g)
        scale = 1.0
        while scale > 1e-8:  # backtracking: Newton's step can overshoot far from the optimum
            na, nb = a - scale * step[0], b - scale * step[1]
            new = _loss(x, t, na, nb)
            if new <= loss + 1e-15:
                break
            scale /= 2
        else:
            break
        a, b, done = na, nb, loss - new < tol * max(1.0, abs(loss))
        loss = new
        if done:
            break
    return float(a), float(b)


def _loss(x: np.ndarray, t: np.ndarray, a: float, b: float) -> float:
    """Mean cross-entropy of targets ``t`` under sigmoid(a x + b), computed stably."""
    z = a * x + b
    return float(np.mean(np.logaddexp(0.0, z) - t * z))

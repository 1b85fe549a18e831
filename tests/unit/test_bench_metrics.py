"""The statistics the benchmarks report: AUROC with ties, and the paired bootstrap of a difference."""
from __future__ import annotations

import numpy as np

from benchmarks.cutoff import auroc, auroc_difference


def test_auroc_counts_every_pair_and_ties_as_half():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.4
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # rounded: many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(scores, labels) == pairs / (len(pos) * len(neg))
    assert auroc(labels.astype(float), labels) == 1.0 and auroc(np.ones(300), labels) == 0.5


def test_a_better_score_has_a_difference_interval_above_zero_and_equal_scores_straddle_it():
    rng = np.random.default_rng(1)
    labels = rng.random(400) < 0.5
    good, noise = rng.random(400) + 0.5 * labels, rng.random(400)
    better = auroc_difference(good, noise, labels, resamples=200)
    assert better["ci95"][0] > 0 and better["ci95"][0] <= better["difference"] <= better["ci95"][1]
    same = auroc_difference(noise, rng.random(400), labels, resamples=200)  # two scores that know nothing
    assert same["ci95"][0] < 0 < same["ci95"][1] and same["ci95"][1] - same["ci95"][0] > 0.02

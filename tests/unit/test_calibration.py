"""Platt scaling of joint-encoder logits (edje_search/calibration.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edje_search.calibration import Calibration, fit_platt, match_probability, sigmoid


@pytest.mark.parametrize("a, b", [(1.5, -2.0), (0.4, 1.0), (3.0, 0.0)])
def test_fit_recovers_a_known_logistic_mapping(a, b):
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 3.0, 40_000)
    y = rng.random(len(x)) < sigmoid(a * x + b)
    got_a, got_b = fit_platt(x, y)
    assert got_a == pytest.approx(a, abs=0.06 * max(1.0, a))
    assert got_b == pytest.approx(b, abs=0.08)
    # and the probabilities it gives are the true ones, to within a couple of points
    grid = np.linspace(-6, 6, 25)
    assert np.max(np.abs(Calibration(got_a, got_b).prob(grid) - sigmoid(a * grid + b))) < 0.02


def test_separable_scores_give_a_finite_steep_fit():
    x = np.concatenate([np.linspace(-5, -1, 50), np.linspace(1, 5, 50)])
    y = x > 0
    a, b = fit_platt(x, y)
    assert np.isfinite([a, b]).all() and a > 1
    p = Calibration(a, b).prob(x)
    assert (p[y] > 0.75).all() and (p[~y] < 0.25).all()  # Platt's targets, 51/52 and 1/52 here, bound it


def test_fit_refuses_one_sided_labels_and_bad_input():
    with pytest.raises(ValueError, match="matching and non-matching"):
        fit_platt([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="labels"):
        fit_platt([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="finite"):
        fit_platt([1.0, np.nan], [True, False])
    with pytest.raises(ValueError, match="finite"):
        Calibration(float("inf"), 0.0)


def test_uncalibrated_probability_is_the_sigmoid_and_round_trips():
    logits = np.array([-800.0, -3.0, 0.0, 2.5, 800.0])
    assert np.allclose(match_probability(logits, None), 1 / (1 + np.exp(-np.clip(logits, -50, 50))))
    assert np.isfinite(sigmoid(logits)).all()  # no overflow at large |logit|
    cal = Calibration(2.0, -1.0, positives=10, negatives=190, rerank_k=20, data="val.json")
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert Calibration.from_dict(None) is None
    assert np.allclose(match_probability(logits, cal), sigmoid(2 * logits - 1))

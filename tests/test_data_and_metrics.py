"""Annotation readers on good and bad files, the generated data set, recall metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edje_search.data.annotations import read_captions
from edje_search.data.synthetic import make_dataset
from edje_search.evaluation import first_correct_rank, recall_at_k, rerank_order, rerank_scores


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)


def test_training_and_eval_formats(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "img" / name)
    train = [{"image": "img/a.png", "caption": "a red thing", "image_id": 1},
             {"image": "img/a.png", "caption": "red square", "image_id": 1},
             {"image": "img/b.png", "caption": "another", "image_id": 2}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    data = read_captions(tmp_path / "train.json")
    assert len(data.images) == 2 and data.captions == ["a red thing", "red square", "another"]
    assert data.caption_image == [0, 0, 1] and data.image_ids == ["1", "2"] and not data.problems
    evalset = [{"image": "img/a.png", "caption": ["x", "y"]}, {"image": "img/c.png", "caption": ["z"]}]
    (tmp_path / "test.json").write_text(json.dumps(evalset))
    data = read_captions(tmp_path / "test.json")
    assert data.image_captions == [[0, 1], [2]]
    lines = ['{"image": "img/a.png", "caption": "one"}', "", '{"image": "img/b.png", "caption": ["two"]}']
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    assert read_captions(tmp_path / "x.jsonl").captions == ["one", "two"]


def test_bad_entries_are_reported_not_dropped_silently(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "ann.jsonl").write_text("\n".join([
        json.dumps({"image": "ok.png", "caption": "fine"}),
        json.dumps({"image": "missing.png", "caption": "gone"}),
        json.dumps({"image": "broken.png", "caption": "bad file"}),
        json.dumps({"image": "ok.png", "caption": "   "}),
        json.dumps({"caption": "no image"}),
        "{not json",
    ]))
    data = read_captions(tmp_path / "ann.jsonl")
    assert data.captions == ["fine"]
    reasons = [r for _, r in data.problems]
    assert len(reasons) == 5
    assert "image file missing" in reasons and "empty caption" in reasons
    assert any("unreadable" in r for r in reasons) and any("invalid JSON" in r for r in reasons)


def test_generated_dataset_is_deterministic_and_compositional(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=6, n_val=2, n_test=4, seed=3, progress=False)
    b = make_dataset(tmp_path / "b", n_train=6, n_val=2, n_test=4, seed=3, progress=False)
    assert a["test"].read_text() == b["test"].read_text()
    assert (tmp_path / "a/test/000001.png").read_bytes() == (tmp_path / "b/test/000001.png").read_bytes()
    test = json.loads(a["test"].read_text())
    assert all(len(e["caption"]) == 2 for e in test)
    words = " ".join(c for e in test for c in e["caption"])
    assert any(w in words for w in ("left of", "right of", "above", "below", " and "))
    train = read_captions(a["train"])
    assert len(train.images) == 6 and len(train.captions) == 12


def test_recall_against_hand_computed_cases():
    order = np.array([[2, 0, 1], [1, 2, 0], [0, 1, 2]])
    ranks = first_correct_rank(order, [{0}, {0}, {0, 2}])
    assert ranks.tolist() == [1, 2, 0]
    r = recall_at_k(ranks, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(100 / 3), "R@2": pytest.approx(200 / 3), "R@3": 100.0}


def test_rerank_order_only_touches_the_head():
    order = np.array([[5, 4, 3, 2, 1]])
    scores = rerank_scores(order, 3, lambda q, items: items.astype(float))  # higher id = better
    assert scores.tolist() == [[5, 4, 3]]
    assert rerank_order(order, scores).tolist() == [[5, 4, 3, 2, 1]]
    new = rerank_order(order, rerank_scores(order, 3, lambda q, items: -items.astype(float)))
    assert new.tolist() == [[3, 4, 5, 2, 1]]


def test_fusion_adds_the_weighted_first_stage_score():
    order = np.array([[7, 8, 9]])
    first = np.array([[0.9, 0.5, 0.1]])  # first-stage similarities, descending
    scores = np.array([[0.0, 1.0, 1.2]])  # the joint encoder prefers 9, then 8
    assert rerank_order(order, scores, first, 0.0).tolist() == [[9, 8, 7]]
    # weight 1: 0.9 / 1.5 / 1.3 -> 8, 9, 7; weight 10: 9 / 6 / 2.2 -> the first-stage order
    assert rerank_order(order, scores, first, 1.0).tolist() == [[8, 9, 7]]
    assert rerank_order(order, scores, first, 10.0).tolist() == [[7, 8, 9]]

"""Annotation readers on good and bad files, the generated data set, recall metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edje_search.data.annotations import read_captions
from edje_search.data.synthetic import make_dataset
from edje_search.evaluation import (encode_set, first_correct_rank, load_eval_set, recall_at_k, rerank_order,
                                    rerank_scores, rerank_set, served_tokens)
from edje_search.ranking import rank_pool
from edje_search.storage.token_store import TokenStore


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


def test_ties_keep_the_first_stage_order():
    logits = np.array([[1.0, 2.0, 1.0, 2.0]], dtype=np.float32)
    positions, fused = rank_pool(logits, np.array([[0.4, 0.3, 0.2, 0.1]]), 0.0)
    assert positions.tolist() == [[1, 3, 0, 2]] and fused.dtype == np.float64
    # fused ties too: 1 + 1 * 0.5 == 0.5 + 1 * 1.0 -> the earlier (higher first-stage) candidate first
    positions, _ = rank_pool(np.array([0.5, 1.0]), np.array([1.0, 0.5]), 1.0)
    assert positions.tolist() == [0, 1]


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_served_tokens_are_what_a_token_store_gives_back(tmp_path, dtype):
    tokens = np.random.default_rng(0).normal(size=(5, 4, 8)).astype(np.float32)
    store = TokenStore(str(tmp_path), 4, 8, dtype, shard_rows=2)
    spans = store.write_segment(0, tokens.astype("float16" if dtype == "int8" else dtype))  # as indexing hands them
    store.set_segments({kind: [(s, n)] for kind, s, n in spans})
    np.testing.assert_array_equal(served_tokens(tokens, dtype), np.asarray(store.get(range(5)), dtype=np.float32))


def _engine_order(engine, captions, data, k):
    """Image indices and joint-encoder logits of each caption's top k from Engine.search_batch."""
    index_of = {str(Path(p).resolve()): i for i, p in enumerate(data.images)}
    hits = engine.search_batch(captions, k=k, rerank_k=k)
    return (np.array([[index_of[str(Path(h.path).resolve())] for h in q] for q in hits]),
            np.array([[h.rerank_score for h in q] for q in hits]))


@pytest.mark.parametrize("token_dtype", ["float16", "int8"])
def test_evaluation_ranks_as_engine_search_does(built_index, shapes_dir, tiny_model_dir, tmp_path, token_dtype):
    """Over an index of the evaluation images, each caption's reranked top k from Engine.search
    is evaluation's order, with and without a fusion weight, so R@k agree too."""
    from edje_search import Engine, load_model

    if token_dtype == "float16":
        engine = Engine.from_pretrained(built_index)
    else:
        engine = Engine.create(tmp_path / "idx8", load_model(tiny_model_dir), token_dtype=token_dtype)
        engine.sync(shapes_dir / "test", num_workers=0, progress=False, batch_size=16)
    assert engine.store.config.token_dtype == token_dtype
    data = load_eval_set(shapes_dir / "test.json")
    k = 8
    enc = encode_set(engine.model, data, token_dtype=token_dtype, num_workers=0, progress=False)
    ranked = rerank_set(engine.model, data, enc, enc.tokens[0], rerank_k=k, progress=False)
    for weight in (0.0, 3.0):
        engine.model.fusion_weight = weight
        order, logits = _engine_order(engine, data.captions, data, k)
        np.testing.assert_array_equal(order, ranked.order("t2i", weight)[:, :k])
        # the same stored tokens give the same logits (float32 tokens would be off by about 3e-7 here)
        positions, _ = rank_pool(ranked.scores["t2i"], ranked.first["t2i"][:, :k], weight)
        np.testing.assert_allclose(logits, np.take_along_axis(ranked.scores["t2i"], positions, axis=1),
                                   rtol=0, atol=5e-8)
        engine_r = recall_at_k(first_correct_rank(order, ranked.targets["t2i"]), ks=(1, 5))
        assert engine_r == {key: ranked.recall("t2i", weight)[key] for key in ("R@1", "R@5")}


def test_rerank_set_scores_a_pair_both_directions_share_once(shapes_dir, tiny_model_dir, monkeypatch):
    """Both directions' scores are what scoring each direction alone gives; shared pairs are scored once."""
    from edje_search import load_model
    from edje_search.evaluation import pair_scorer

    model = load_model(tiny_model_dir)
    data = load_eval_set(shapes_dir / "test.json")
    enc = encode_set(model, data, num_workers=0, progress=False)
    calls = []
    score_pairs = model.reranker.score_pairs  # counted, then run for real
    monkeypatch.setattr(model.reranker, "score_pairs", lambda captions, tokens, cap, img, **kw: calls.append(
        len(cap)) or score_pairs(captions, tokens, cap, img, **kw))
    ranked = rerank_set(model, data, enc, enc.tokens[0], rerank_k=5, progress=False)
    monkeypatch.undo()
    for d in ("t2i", "i2t"):
        alone = rerank_scores(ranked.orders[d], 5, pair_scorer(model, data.captions, enc.tokens[0],
                                                                captions_are_queries=d == "t2i", progress=False))
        np.testing.assert_allclose(ranked.scores[d], alone, rtol=0, atol=1e-5)
    t2i = {(c, int(i)) for c, row in enumerate(ranked.orders["t2i"][:, :5]) for i in row}
    i2t = {(int(c), i) for i, row in enumerate(ranked.orders["i2t"][:, :5]) for c in row}
    assert t2i & i2t and calls == [len(t2i | i2t)]

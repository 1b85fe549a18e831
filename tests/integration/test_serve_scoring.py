"""POST /score, /score/image, /classify and /classify/image through the real ASGI app."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'edje-search[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from edje_search import Engine  # noqa: E402
from edje_search.classify import ClassifySettings, classify_rows  # noqa: E402
from edje_search.scoring import sigmoid  # noqa: E402
from edje_search.serve import BatchSettings, ServeLimits, create_app  # noqa: E402

LIMITS = ServeLimits(max_upload_bytes=256 * 1024, max_json_bytes=16 * 1024, max_rerank_k=50)
LABELS = ["a red circle", "a blue square", "a green triangle", "a yellow diamond"]


@pytest.fixture(scope="module")
def engine(_built_index, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_scoring") / "idx"
    shutil.copytree(_built_index, d)
    return Engine.from_pretrained(d)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, limits=LIMITS, batching=BatchSettings(max_wait_ms=5))) as c:
        yield c


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text[:300]
    return response.json()["error"]


def test_score_rows(client, engine):
    texts = ["a small red circle left of a large blue square", "two blue squares and a green circle", "a cat"]
    rows = [0, 5, 5]
    body = client.post("/score", json={"texts": texts, "rows": rows}).json()
    logits, cosines = engine.scorer().score_texts(texts, rows)
    got = body["results"]
    assert [(r["text"], r["row"]) for r in got] == list(zip(texts, rows))
    np.testing.assert_allclose([r["logit"] for r in got], logits, atol=1e-6)
    np.testing.assert_allclose([r["cosine"] for r in got], cosines, atol=1e-6)
    np.testing.assert_allclose([r["prob"] for r in got], sigmoid(logits), atol=1e-6)
    assert all(r["path"] == engine.paths([r["row"]])[r["row"]] for r in got)
    one = client.post("/score", json={"texts": [texts[0]], "rows": [1, 2, 3]}).json()["results"]
    np.testing.assert_allclose([r["logit"] for r in one], engine.score([texts[0]] * 3, [1, 2, 3]), atol=1e-6)

    assert "one text per row" in error_of(client.post("/score", json={"texts": ["a", "b"], "rows": [1, 2, 3]}), 400)
    assert "not in the index" in error_of(client.post("/score", json={"texts": ["a"], "rows": [10**6]}), 400)
    assert "too many rows" in error_of(client.post("/score", json={"texts": ["a"], "rows": list(range(51))}), 400)
    assert "empty" in error_of(client.post("/score", json={"texts": [" "], "rows": [1]}), 400)
    assert error_of(client.post("/score", json={"texts": "a"}), 422)


def test_score_and_classify_upload(client, engine):
    path = engine.paths([3])[3]
    data = open(path, "rb").read()
    texts = ["a small red circle left of a large blue square", "a green triangle"]
    got = client.post("/score/image", files={"file": ("q.png", data, "image/png")}, data={"texts": texts}).json()
    pixels = engine.model.first_stage.preprocess(Image.open(path).convert("RGB"))[None].expand(2, -1, -1, -1)
    expected = engine.model.reranker.score(texts, pixel_values=pixels).numpy()
    np.testing.assert_allclose([r["logit"] for r in got["results"]], expected, atol=1e-5)
    # the stored fp16 tokens of the same file score the same within fp16 rounding
    np.testing.assert_allclose([r["logit"] for r in got["results"]], engine.score(texts, [3, 3]), atol=1e-4)

    labelled = client.post("/classify/image", files={"file": ("q.png", data, "image/png")},
                           data={"labels": LABELS, "template": "there is {}", "shortlist": 3, "top_k": 3}).json()
    settings = ClassifySettings(template="there is {}", shortlist=3, top_k=3)
    by_row = next(classify_rows(engine.scorer(), LABELS, [3], settings))
    assert [x["label"] for x in labelled["labels"]] == [x["label"] for x in by_row["labels"]]
    np.testing.assert_allclose([x["logit"] for x in labelled["labels"]], [x["logit"] for x in by_row["labels"]],
                               atol=1e-4)

    bad = client.post("/score/image", files={"file": ("q.png", b"not an image", "image/png")}, data={"texts": ["a"]})
    assert "not a usable image" in error_of(bad, 400)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big, "PNG")
    assert error_of(client.post("/score/image", files={"file": ("q.png", big.getvalue(), "image/png")},
                                data={"texts": ["a"]}), 413)


def test_classify_rows(client, engine):
    body = {"labels": LABELS, "rows": [0, 1, 2], "template": "a photo of {}", "shortlist": 3, "top_k": 2}
    got = client.post("/classify", json=body).json()
    expected = list(classify_rows(engine.scorer(), LABELS, [0, 1, 2], ClassifySettings(shortlist=3, top_k=2,
                                                                                 template="a photo of {}")))
    assert got["results"] == expected
    multi = client.post("/classify", json={**body, "multi_label": True, "min_prob": 0.0}).json()["results"]
    assert all(len(r["labels"]) == 3 for r in multi)
    assert "repeat" in error_of(client.post("/classify", json={**body, "labels": ["a", "a"]}), 400)
    assert "template" in error_of(client.post("/classify", json={**body, "template": "no slot"}), 400)
    assert "shortlist" in error_of(client.post("/classify", json={**body, "shortlist": 0}), 400)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/score", "/score/image", "/classify", "/classify/image"} <= set(paths)

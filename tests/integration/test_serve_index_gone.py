"""A server notices its index folder being deleted (503, never the old rows) and serves the
index rebuilt at the same path."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'edje-search[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from edje_search import Engine, load_model  # noqa: E402
from edje_search.serve import create_app  # noqa: E402

QUERY = "a small red circle left of a large blue square"


def test_deleted_index_answers_503_and_a_rebuilt_one_is_served(built_index, tiny_model_dir, shapes_dir):
    app = create_app(Engine.from_pretrained(built_index), refresh_interval_s=0)
    with TestClient(app) as c:
        before = c.get("/search", params={"q": QUERY, "k": 5, "rerank_k": 0})
        assert before.status_code == 200 and c.get("/info").json()["images"] == 40
        shutil.rmtree(built_index)
        for response in (c.get("/search", params={"q": QUERY, "k": 5, "rerank_k": 0}), c.get("/info")):
            assert response.status_code == 503, response.text
            assert f"index {built_index} was removed" in response.json()["error"]
        # rebuilt in place from other images, with the same model
        fresh = sorted((shapes_dir / "train").glob("*.png"))[:6]
        Engine.create(built_index, load_model(tiny_model_dir)).add(fresh, num_workers=0, progress=False)
        after = c.get("/search", params={"q": QUERY, "k": 10, "rerank_k": 0})
        assert after.status_code == 200, after.text
        assert sorted(h["path"] for h in after.json()["hits"]) == sorted(str(p) for p in fresh)
        assert c.get("/info").json()["images"] == 6


def test_an_index_replaced_by_another_model_is_refused(built_index, tmp_path, shapes_dir):
    from edje_search.models.registry import build_tiny_model

    app = create_app(Engine.from_pretrained(built_index), refresh_interval_s=0)
    with TestClient(app) as c:
        assert c.get("/info").status_code == 200
        shutil.rmtree(built_index)
        other = build_tiny_model(seed=5)
        other.save_pretrained(tmp_path / "other")
        Engine.create(built_index, load_model(tmp_path / "other"))
        response = c.get("/search", params={"q": QUERY, "k": 5, "rerank_k": 0})
        assert response.status_code == 503 and "replaced by one built with another model" in response.json()["error"]


def test_an_index_deleted_before_any_query_is_reported_removed_not_repairable(built_index):
    """The default refresh interval: the first query after the deletion reads segments that are
    gone, and must say the index was removed rather than advise a repair."""
    app = create_app(Engine.from_pretrained(built_index), refresh_interval_s=3600)
    with TestClient(app) as c:
        shutil.rmtree(built_index)
        response = c.get("/search", params={"q": QUERY, "k": 5, "rerank_k": 5})
        assert response.status_code == 503 and f"index {built_index} was removed" in response.json()["error"], \
            response.text
        assert "repair" not in response.json()["error"]

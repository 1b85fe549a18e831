"""Hits whose image file was deleted from disk are flagged, and verify lists those rows."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from edje_search_cli.main import cli, register_commands

QUERY = "a small red circle left of a large blue square"


@pytest.fixture
def own_index(tmp_path, tiny_model_dir, shapes_dir):
    """An index of copies of 8 images, so that deleting one touches no other test's files."""
    import shutil

    from edje_search import Engine, load_model

    files = tmp_path / "files"
    files.mkdir()
    for f in sorted((shapes_dir / "test").glob("*.png"))[:8]:
        shutil.copy(f, files / f.name)
    Engine.create(tmp_path / "idx", load_model(tiny_model_dir)).sync(files, num_workers=0, progress=False)
    return tmp_path / "idx"


def test_query_and_verify_flag_files_gone_from_disk(own_index):
    from edje_search.storage.index_store import IndexStore

    register_commands()
    store = IndexStore.open(own_index)
    gone = store.paths([7])[7]
    os.unlink(gone)
    runner = CliRunner()
    out = runner.invoke(cli, ["query", QUERY, "--index", str(own_index), "-k", "8", "--rerank-k", "0", "--json"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)[0]["hits"]
    assert [h["path"] for h in hits if h["missing"]] == [gone]
    assert f"note: 1 hits name image files that are gone from disk (first: {gone})" in out.stderr
    verify = runner.invoke(cli, ["verify", "--index", str(own_index)])
    assert verify.exit_code == 0 and f"note: row 7 names a file that is gone: {gone}" in verify.stderr
    as_json = json.loads(runner.invoke(cli, ["verify", "--index", str(own_index), "--json"]).stdout)
    assert as_json["ok"] and as_json["files_gone"] == [{"row": 7, "path": gone}]


def test_the_api_flags_hits_whose_file_is_gone(own_index):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from edje_search import Engine
    from edje_search.serve import create_app

    engine = Engine.from_pretrained(own_index)
    with TestClient(create_app(engine)) as c:
        hits = c.get("/search", params={"q": QUERY, "k": 8, "rerank_k": 0}).json()["hits"]
        assert not any(h["missing"] for h in hits)
        gone = hits[5]["path"]
        os.unlink(gone)
        hits = c.get("/search", params={"q": QUERY, "k": 8, "rerank_k": 0}).json()["hits"]
        assert [h["path"] for h in hits if h["missing"]] == [gone]

"""`edje-search duplicates`: exact copies by content hash, near-duplicates by a FAISS range search
over first-stage vectors, on an index holding planted resized and recompressed copies."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edje_search import Engine, load_model
from edje_search.storage.duplicates import find_duplicates, near_pairs
from edje_search.storage.index_store import IndexStore
from edje_search_cli.main import cli


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model_dir):
    """24 distinct images; 4 with a resized copy, 4 with a JPEG-recompressed copy, 2 with a byte copy."""
    root = tmp_path_factory.mktemp("dups")
    lib = root / "lib"
    lib.mkdir()
    rng = np.random.default_rng(5)
    pairs = []
    for i in range(24):
        px = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        px[:, :32] = rng.integers(0, 255, 3)
        px[:32, 32:] = rng.integers(0, 255, 3)
        img = Image.fromarray(px)
        img.save(lib / f"orig_{i:02d}.png")
        if i < 4:
            img.resize((48, 48), Image.BICUBIC).save(lib / f"small_{i:02d}.png")
            pairs.append((f"orig_{i:02d}.png", f"small_{i:02d}.png"))
        elif i < 8:
            img.save(lib / f"jpeg_{i:02d}.jpg", quality=40)
            pairs.append((f"orig_{i:02d}.png", f"jpeg_{i:02d}.jpg"))
        elif i < 10:
            shutil.copy(lib / f"orig_{i:02d}.png", lib / f"copy_{i:02d}.png")
    index = root / "idx"
    Engine.create(index, load_model(tiny_model_dir), factory="Flat").sync(lib, num_workers=0, progress=False)
    return index, pairs


def _names(index) -> dict[int, str]:
    return {e.row: Path(e.path).name for e in IndexStore.open(index).iter_entries()}


def test_exact_copies_grouped_by_hash(planted):
    index, _ = planted
    store = IndexStore.open(index)
    exact = find_duplicates(store, 0.999)["exact"]
    assert sorted(sorted(Path(p).name for p in g.paths) for g in exact) == [
        ["copy_08.png", "orig_08.png"], ["copy_09.png", "orig_09.png"]]


def test_near_duplicates_found_and_equal_to_brute_force(planted):
    index, pairs = planted
    store = IndexStore.open(index)
    names = _names(index)
    rows = np.array(sorted(names), dtype=np.int64)
    v = store.vectors(rows).astype(np.float32)
    sims = v @ v.T
    by_name = {n: i for i, n in enumerate(names[r] for r in rows)}
    planted_sims = [sims[by_name[a], by_name[b]] for a, b in pairs]
    # each planted copy's nearest other image is its original
    for a, b in pairs:
        s = sims[by_name[b]].copy()
        s[by_name[b]] = -np.inf
        assert names[rows[int(np.argmax(s))]] == a
    # a threshold between the lowest planted similarity and the next similarity below it
    low = min(planted_sims)
    below = sims[np.triu_indices(len(rows), 1)]
    below = below[below < low]
    threshold = float((low + below.max()) / 2) if len(below) else float(low) - 1e-4
    got = {(min(a, b), max(a, b)) for a, b, _ in near_pairs(store, threshold)}
    iu = np.triu_indices(len(rows), 1)
    want = {(int(rows[i]), int(rows[j])) for i, j in zip(*iu) if sims[i, j] >= threshold}
    assert got == want  # the range search finds exactly the pairs brute force finds
    found_names = {frozenset((names[a], names[b])) for a, b in got}
    assert all(frozenset(p) in found_names for p in pairs)  # recall of planted pairs: 1.0
    groups = find_duplicates(store, threshold)["near"]
    for a, b in pairs:
        assert any(a in [Path(p).name for p in g.paths] and b in [Path(p).name for p in g.paths] for g in groups)


def test_cli_duplicates_json_and_text(planted):
    index, _ = planted
    r = CliRunner().invoke(cli, ["duplicates", "--index", str(index), "--threshold", "0.9999", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["threshold"] == 0.9999 and len(data["exact"]) == 2 and data["images"] == 34
    assert all(g["kind"] == "near" and len(g["paths"]) >= 2 and g["similarity"] >= 0.9999 for g in data["near"])
    text = CliRunner().invoke(cli, ["duplicates", "--index", str(index)])
    assert text.exit_code == 0 and "2 groups of exact copies" in text.stdout
    bad = CliRunner().invoke(cli, ["duplicates", "--index", str(index), "--threshold", "2"])
    assert bad.exit_code == 2


def test_removed_rows_are_not_reported(planted, tmp_path):
    index, _ = planted
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    engine = Engine.from_pretrained(copy, writable=True)
    gone = [p for p in IndexStore.open(copy).entries if Path(p.path).name == "copy_08.png"]
    engine.remove([gone[0].path])
    store = IndexStore.open(copy)
    exact = find_duplicates(store, 0.999)["exact"]
    assert len(exact) == 1
    assert all(r != gone[0].row for a, b, _ in near_pairs(store, 0.99) for r in (a, b))


def test_query_dedupe_collapses_near_duplicates(planted):
    index, _ = planted
    threshold = 0.9995
    args = ["query", "red", "--index", str(index), "-k", "8", "--json"]
    plain = json.loads(CliRunner().invoke(cli, args).stdout)[0]["hits"]
    r = CliRunner().invoke(cli, [*args, "--dedupe", "--dedupe-threshold", str(threshold)])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)[0]["hits"]
    assert len(hits) == 8 and [h["rank"] for h in hits] == list(range(1, 9))
    store = IndexStore.open(index)
    rows = [h["row"] for h in hits]
    v = store.vectors(rows)
    sims = v @ v.T - 2 * np.eye(len(rows))
    assert sims.max() < threshold  # no two kept hits are near-duplicates of each other
    by_path = {e.path: e.row for e in store.iter_entries()}
    absorbed = [(h["row"], p) for h in hits for p in h["near_duplicates"]]
    for row, p in absorbed:  # each absorbed image is a near-duplicate of the hit it is listed under
        assert float(store.vectors([row])[0] @ store.vectors([by_path[p]])[0]) >= threshold
    pv = store.vectors([h["row"] for h in plain])
    assert (pv @ pv.T - 2 * np.eye(8) >= threshold).any()  # without --dedupe the top 8 holds near-duplicates
    assert absorbed


def test_http_duplicates(planted):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from edje_search.serve import create_app

    index, _ = planted
    with TestClient(create_app(Engine.from_pretrained(index))) as c:
        got = c.get("/duplicates", params={"threshold": 0.9999}).json()
        assert sorted(sorted(Path(i["path"]).name for i in g["images"]) for g in got["exact"]) == [
            ["copy_08.png", "orig_08.png"], ["copy_09.png", "orig_09.png"]]
        first = got["exact"][0]["images"][0]
        assert first["thumbnail_url"] == f"/thumbnails/{first['row']}"
        assert c.get("/duplicates", params={"threshold": 3}).status_code == 422

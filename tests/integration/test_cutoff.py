"""The relevance cutoff (match probability, min_prob), --sort by a metadata field, filtered image
search, and the calibration `calibrate` fits and stores with the model."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edje_search import Engine, load_model
from edje_search.calibration import Calibration
from edje_search.errors import BadQuery
from edje_search.models.info import read_bundle_info
from edje_search_cli.main import cli

QUERY = "a small red circle left of a large blue square"
TAKEN = {0: "2021:05:01 10:00:00", 1: "2019:01:02 08:00:00", 2: "2023:07:09 18:30:00", 4: "2020:02:02 12:00:00",
         6: "2022:11:11 11:11:11"}  # the others carry no date


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """10 JPEGs in two folders; five with an EXIF date taken, each with its own file time."""
    root = tmp_path_factory.mktemp("cutoff_photos")
    rng = np.random.default_rng(11)
    for i in range(10):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(exist_ok=True)
        px = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        px[:, :16] = rng.integers(0, 255, 3)
        ex = Image.Exif()
        if i in TAKEN:
            ex.get_ifd(0x8769)[0x9003] = TAKEN[i]
        path = folder / f"img_{i}.jpg"
        Image.fromarray(px).save(path, "JPEG", quality=90, exif=ex)
        os.utime(path, ns=(1_600_000_000_000_000_000 + i * 10**12,) * 2)
    return root


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model_dir, photos) -> Path:
    d = tmp_path_factory.mktemp("cutoff_idx") / "idx"
    stars = {str(photos / ("a" if i % 2 == 0 else "b") / f"img_{i}.jpg"): {"stars": i % 4} for i in range(0, 10, 3)}
    Engine.create(d, load_model(tiny_model_dir), factory="Flat").sync(photos, num_workers=0, progress=False,
                                                                      metadata=stars)
    return d


@pytest.fixture(scope="module")
def engine(index):
    return Engine.from_pretrained(index)


def _num(path: str) -> int:
    return int(Path(path).stem.split("_")[1])


# ------------------------------------------------------------------------- cutoff
def test_hits_carry_a_probability_only_when_reranked(engine):
    hits = engine.search(QUERY, k=10, rerank_k=4)
    assert all(h.prob is not None and 0 < h.prob < 1 for h in hits[:4])
    assert all(h.prob is None and h.rerank_score is None for h in hits[4:])
    for h in hits[:4]:  # uncalibrated: sigmoid of the logit
        assert h.prob == pytest.approx(1 / (1 + np.exp(-h.rerank_score)))


def test_min_prob_keeps_exactly_the_hits_at_or_above_it(engine):
    everything = engine.search(QUERY, k=10, rerank_k=10)
    probs = sorted(h.prob for h in everything)
    for p in (probs[0], probs[3], probs[7], probs[-1]):
        got = engine.search(QUERY, k=10, rerank_k=10, min_prob=p)
        want = [h.row for h in everything if h.prob >= p]
        assert [h.row for h in got] == want and want
        assert [h.rank for h in got] == list(range(1, len(want) + 1))
    # only reranked hits can pass: k is capped at rerank_k
    capped = engine.search(QUERY, k=10, rerank_k=3, min_prob=0.0)
    assert len(capped) == 3 and all(h.prob is not None for h in capped)
    assert engine.search_batch([QUERY, "a blue square"], k=10, min_prob=1.0) == [[], []]


def test_bad_cutoffs_are_refused(engine):
    with pytest.raises(BadQuery, match="between 0 and 1"):
        engine.search(QUERY, min_prob=1.5)
    with pytest.raises(BadQuery, match="rerank_k must be at least 1"):
        engine.search(QUERY, rerank_k=0, min_prob=0.5)


def test_cli_min_prob_can_answer_no_image_matches(index):
    r = CliRunner().invoke(cli, ["query", QUERY, "--index", str(index), "--min-prob", "1"])
    assert r.exit_code == 0, r.output
    assert "no image matches" in r.stdout
    j = CliRunner().invoke(cli, ["query", QUERY, "--index", str(index), "--min-prob", "1", "--json"])
    assert j.exit_code == 0 and json.loads(j.stdout) == [{"query": QUERY, "hits": []}]
    some = CliRunner().invoke(cli, ["query", QUERY, "--index", str(index), "-k", "8", "--rerank-k", "5",
                                    "--min-prob", "0", "--json"])
    hits = json.loads(some.stdout)[0]["hits"]
    assert len(hits) == 5 and all(h["prob"] is not None for h in hits)
    assert "at most --rerank-k 5" in some.stderr
    bad = CliRunner().invoke(cli, ["query", QUERY, "--index", str(index), "--min-prob", "0.5", "--rerank-k", "0"])
    assert bad.exit_code == 2 and "--rerank-k" in bad.stderr and "--min-prob" in bad.stderr


def test_calibration_is_used_for_prob_and_stored_with_the_model(tmp_path, tiny_model_dir, index):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    model = load_model(model_dir)
    fingerprint = model.fingerprint()
    model.calibration = Calibration(50.0, -1.5, positives=3, negatives=30, rerank_k=10, data="val.json")
    model.save_info()
    assert read_bundle_info(model_dir).calibration["a"] == 50.0
    again = load_model(model_dir)
    assert again.calibration == model.calibration and again.fingerprint() == fingerprint  # not in the fingerprint
    engine = Engine.from_pretrained(index, model=again)
    hits = engine.search(QUERY, k=5, rerank_k=5)
    assert [h.prob for h in hits] == pytest.approx([float(model.calibration.prob(h.rerank_score)) for h in hits])
    # score uses the same probability
    from edje_search.scoring import Pair

    records, bad = engine.scorer().score([Pair(0, h.path, QUERY, h.path) for h in hits])
    assert not bad and [r["prob"] for r in records] == pytest.approx([h.prob for h in hits], abs=1e-6)


def test_calibrate_fits_and_writes_the_probability(tmp_path, tiny_model_dir, shapes_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    before = json.loads((model_dir / "edje.json").read_text())
    r = CliRunner().invoke(cli, ["calibrate", "--data", str(shapes_dir / "val.json"), "--model", str(model_dir),
                                 "--rerank-k", "4", "--fit", "probability", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    cal = out["calibration"]
    n_captions = out["n_captions"]
    assert cal["positives"] == n_captions and cal["negatives"] >= 3 * n_captions
    info = read_bundle_info(model_dir)
    assert info.calibration["a"] == cal["a"] and info.calibration["data"].endswith("val.json")
    assert info.fusion_weight == before["fusion_weight"] and info.fingerprint == before["fingerprint"]
    assert cal["log_loss"] <= cal["log_loss_sigmoid"] + 1e-9  # the fit is at least as good as no fit
    text = CliRunner().invoke(cli, ["calibrate", "--data", str(shapes_dir / "val.json"), "--model", str(model_dir),
                                    "--rerank-k", "4", "--dry-run"])
    assert text.exit_code == 0 and "match probability = sigmoid(" in text.stdout and "fusion weight" in text.stdout


# --------------------------------------------------------------------------- sort
def test_sort_by_field_with_missing_last(engine):
    hits = engine.search(QUERY, k=10)
    relevance = [h.row for h in hits]
    taken = engine.search(QUERY, k=10, sort="taken")
    nums = [_num(h.path) for h in taken]
    dated = sorted(TAKEN, key=lambda i: TAKEN[i])
    assert nums[:5] == dated and set(nums[5:]) == set(range(10)) - set(TAKEN)
    missing = [h.row for h in taken[5:]]
    assert missing == [r for r in relevance if r in missing]  # ties (all missing) keep relevance order
    newest = [_num(h.path) for h in engine.search(QUERY, k=10, sort="-taken")]
    assert newest[:5] == dated[::-1] and set(newest[5:]) == set(range(10)) - set(TAKEN)
    # the rank stays the relevance rank
    assert sorted(h.rank for h in taken) == list(range(1, 11))
    assert {h.row: h.rank for h in taken} == {h.row: h.rank for h in hits}


def test_sort_by_date_user_field_size_and_name(engine):
    by_date = [_num(h.path) for h in engine.search(QUERY, k=10, sort="date")]
    # date = taken, else the file time (2020-09-13 onwards here, after every EXIF date but 2021-2023's)
    assert len(by_date) == 10 and by_date.index(1) == 0 and by_date[-1] == 2
    stars = engine.search(QUERY, k=10, sort="-stars")
    assert [_num(h.path) % 4 for h in stars[:4]] == [3, 2, 1, 0] and len(stars) == 10
    names = [Path(h.path).name for h in engine.search(QUERY, k=10, sort="-name")]
    assert names == sorted(names, reverse=True)
    top3 = engine.search(QUERY, k=3)
    assert {h.row for h in engine.search(QUERY, k=3, sort="size")} == {h.row for h in top3}  # relevance chooses
    with pytest.raises(BadQuery, match="cannot sort by 'nope'.*fields: date, path"):
        engine.search(QUERY, sort="nope")
    with pytest.raises(BadQuery, match="give a field name"):
        engine.search(QUERY, sort="taken; drop")


def test_date_of_files_written_within_one_second_keeps_their_order():
    from edje_search.sorting import field_value
    from edje_search.storage.manifest import ManifestEntry

    second = 1_700_000_000 * 10**9
    early, late = (ManifestEntry(i, f"/p/{i}.jpg", None, mtime_ns=second + ns)
                   for i, ns in enumerate((1_000, 900_000_000)))
    assert field_value(early, "date") < field_value(late, "date")
    assert field_value(late, "date") == "2023-11-14T22:13:20.900000"
    exif = ManifestEntry(2, "/p/2.jpg", None, mtime_ns=second, meta={"taken": "2023-11-14T22:13:20"})
    assert field_value(exif, "date") < field_value(early, "date")  # a date taken, to the second, sorts first


def test_cli_sort_and_where(index, photos):
    r = CliRunner().invoke(cli, ["query", QUERY, "--index", str(index), "--sort", "-taken", "--under",
                                 str(photos / "a"), "--json"])
    assert r.exit_code == 0, r.output
    nums = [_num(h["path"]) for h in json.loads(r.stdout)[0]["hits"]]
    assert nums == [2, 6, 0, 4, 8]
    bad = CliRunner().invoke(cli, ["query", QUERY, "--index", str(index), "--sort", "colour"])
    assert bad.exit_code == 2 and "cannot sort by 'colour'" in bad.stderr


# -------------------------------------------------------------------- image search
def test_search_by_image_honours_where_and_under(engine, photos):
    rows = {_num(h.path): h.row for h in engine.search(QUERY, k=10)}
    found = engine.search_by_image([rows[0]], k=10, where='taken >= "2020-01-01"')[0]
    assert {_num(h.path) for h in found} == {2, 4, 6}  # dated 2020 or later, the query row left out
    under = engine.search_by_image([rows[0]], k=10, under=str(photos / "b"))[0]
    assert {_num(h.path) for h in under} == {1, 3, 5, 7, 9}
    pixels = engine.preprocess(Image.open(photos / "b" / "img_1.jpg").convert("RGB"))
    upload = engine.search_by_image([pixels], k=10, where='name glob "img_1*"')[0]
    assert [_num(h.path) for h in upload] == [1]
    assert engine.search_by_image([rows[0]], k=3, where='make = "Leica"') == [[]]


# ---------------------------------------------------------------------------- HTTP
def test_http_min_prob_sort_and_image_where(engine, photos):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from edje_search.serve import BatchSettings, create_app

    with TestClient(create_app(engine, batching=BatchSettings(max_wait_ms=5))) as c:
        none = c.get("/search", params={"q": QUERY, "k": 5, "min_prob": 1.0})
        assert none.status_code == 200 and none.json()["hits"] == [] and none.json()["min_prob"] == 1.0
        some = c.get("/search", params={"q": QUERY, "k": 8, "rerank_k": 4, "min_prob": 0}).json()
        assert len(some["hits"]) == 4 and all(h["prob"] is not None for h in some["hits"])
        many = c.post("/search", json={"queries": [QUERY, "x"], "k": 5, "min_prob": 1.0})
        assert [r["hits"] for r in many.json()["results"]] == [[], []]
        by_date = c.get("/search", params={"q": QUERY, "k": 10, "sort": "-taken"}).json()
        assert [_num(h["path"]) for h in by_date["hits"][:5]] == [2, 6, 0, 4, 1]
        assert sorted(h["rank"] for h in by_date["hits"]) == list(range(1, 11))
        assert c.get("/search", params={"q": QUERY, "sort": "nope"}).status_code == 400
        assert c.get("/search", params={"q": QUERY, "min_prob": 2}).status_code == 400
        row = by_date["hits"][0]["row"]
        img = c.post("/search/image", data={"row": row, "k": 10, "where": 'folder glob "*/b"'})
        assert img.status_code == 200
        assert {_num(h["path"]) for h in img.json()["hits"]} == {1, 3, 5, 7, 9}
        bad = c.post("/search/image", data={"row": row, "where": "width >"})
        assert bad.status_code == 400 and "position" in bad.json()["error"]

"""Token stores, the FAISS wrapper and atomic index commits."""
from __future__ import annotations

import os

import numpy as np
import pytest

from edje_search.config import IndexConfig
from edje_search.storage import vector_index
from edje_search.errors import BadInput, EdjeError, IndexCorrupt, IndexLocked
from edje_search.storage.index_store import IndexStore
from edje_search.storage.token_store import TokenStore, bytes_per_image, quantize_per_token


def test_token_store_round_trip_is_exact_across_commits_with_gaps(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((37, 4, 8)).astype(np.float16)
    store = TokenStore(str(tmp_path), 4, 8, "float16", shard_rows=8)
    spans = [s for _, *s in store.write_segment(0, data[:20]) + store.write_segment(24, data[20:])]
    assert spans == [[0, 20], [24, 17]]
    store = TokenStore(str(tmp_path), 4, 8, "float16", shard_rows=8, segments={"tokens": spans})
    assert len(store) == 41
    rows = np.array([40, 0, 5, 5, 19, 24])
    got = store.get(rows)
    assert got.dtype == np.float16 and got.shape == (6, 4, 8)
    assert np.array_equal(got, data[[36, 0, 5, 5, 19, 20]])
    for never in (20, 23, 41):  # the gap between commits, and beyond the end
        with pytest.raises(IndexError, match="never committed"):
            store.get([never])
    with pytest.raises(ValueError, match="shard boundary"):
        store.write_segment(41, data[:1])


def test_int8_quantization_error_is_half_a_step_per_token():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 64, 384)) * rng.uniform(0.01, 50, (5, 64, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token must survive (scale 0)
    q, scale = quantize_per_token(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (5, 64, 1)
    back = q.astype(np.float32) * scale.astype(np.float32)
    step = scale.astype(np.float32)
    assert np.all(np.abs(back - x) <= 0.5 * step * (1 + 1e-3) + np.abs(x) * 2e-3)  # + fp16 rounding of the scale
    assert np.array_equal(back[0, 0], np.zeros(384))
    q2, scale2 = quantize_per_token(back)  # re-quantizing a dequantized row changes nothing
    assert np.array_equal(q2, q) and np.array_equal(scale2, scale)


def test_int8_store_round_trip_and_size(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.standard_normal((23, 64, 384)).astype(np.float16)
    store = TokenStore(str(tmp_path), 64, 384, "int8", shard_rows=16)
    spans = {}
    for kind, s, n in store.write_segment(0, data[:10]) + store.write_segment(16, data[10:]):
        spans.setdefault(kind, []).append((s, n))
    store.set_segments(spans)
    rows = np.array([28, 0, 9, 9, 16])
    q, scale = quantize_per_token(data[[22, 0, 9, 9, 10]])
    np.testing.assert_array_equal(store.get(rows), q.astype(np.float32) * scale.astype(np.float32))
    assert bytes_per_image(64, 384, "int8") == 24_704 <= 25_000
    assert bytes_per_image(64, 384, "float16") == 49_152
    shards = [p for p in (tmp_path / "tokens.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    # tokens: each row its bytes and a 4-byte CRC-32C, each shard a 16-byte index entry per row slot
    # + a 4-byte CRC; scales: each shard one chunk of all 16 rows' scales + CRC, a one-entry index + CRC
    want = 23 * (64 * 384 + 4) + 2 * (16 * 16 + 4) + 2 * (16 * 64 * 2 + 4 + 16 + 4)
    assert len(shards) == 4 and sum(p.stat().st_size for p in shards) == want
    with pytest.raises(ValueError, match="token dtype"):
        TokenStore(str(tmp_path), 2, 2, "int4", shard_rows=16)


def test_flat_faiss_equals_exact_knn():
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((500, 24)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((30, 24)).astype(np.float32)
    index = vector_index.new_index("Flat", 24)
    ids = np.arange(1000, 1500)
    vector_index.add_vectors(index, xb, ids)
    scores, rows = vector_index.search(index, xq, 10)
    sims = xq @ xb.T
    ref = np.argsort(-sims, axis=1)[:, :10]
    assert np.array_equal(rows, ids[ref])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ref, 1), rtol=1e-5, atol=1e-5)


def test_bad_factory_string_is_a_value_error():
    with pytest.raises(ValueError, match="factory"):
        vector_index.new_index("NotAnIndex99", 8)


def _config(**kw):
    base = dict(factory="Flat", dim=8, tokens_per_image=2, token_width=4, token_dtype="float16",
                model_path="m", model_fingerprint="f")
    return IndexConfig(**{**base, **kw})


def _commit(store, paths, v, t, removed=()):
    with store.writing():
        store.commit(paths, ["h"] * len(paths), v, t, removed_rows=removed)


def _unit(rng, n, d=8):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_index_store_commit_reopen_and_remove(tmp_path):
    rng = np.random.default_rng(2)
    store = IndexStore.create(tmp_path / "i", _config())
    v = _unit(rng, 6)
    t = rng.standard_normal((6, 2, 4)).astype(np.float16)
    _commit(store, [f"/p{i}" for i in range(6)], v, t)
    _commit(store, [], v[:0], t[:0], removed=[1, 3])
    assert store.paths(range(6)) == {0: "/p0", 2: "/p2", 4: "/p4", 5: "/p5"}  # follows each commit
    again = IndexStore.open(tmp_path / "i")
    assert [e.path for e in again.entries] == ["/p0", "/p2", "/p4", "/p5"]
    assert len(again) == 4 and again.n_rows == 6 and again.generation == 2
    assert np.array_equal(again.tokens.get([4]), t[4:5])
    np.testing.assert_array_equal(again.vectors([5]), v[5:6])
    _, rows = again.search(v[1:2], 6)
    assert 1 not in rows[0].tolist() and 3 not in rows[0].tolist() and -1 in rows[0].tolist()


def test_commit_writes_only_the_batch(tmp_path):
    """O(batch) commits: each commit adds one new file per store and one FAISS segment, and
    rewrites none of the files an earlier commit wrote."""
    rng = np.random.default_rng(6)
    store = IndexStore.create(tmp_path / "i", _config())
    v, t = _unit(rng, 30), rng.standard_normal((30, 2, 4)).astype(np.float16)
    _commit(store, [f"/p{i}" for i in range(10)], v[:10], t[:10])
    def stored():  # every data file: vector segments, token shards, FAISS segments (not metadata)
        return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "i").rglob("*")
                if p.is_file() and (p.suffix in (".npy", ".index") or p.parent.parent.parent.name == "c")}

    before = stored()
    _commit(store, [f"/p{i}" for i in range(10, 30)], v[10:], t[10:])
    after = stored()
    assert all(after[p] == before[p] for p in before)
    assert len(set(after) - set(before)) == 3  # vectors, token shard, FAISS segment of the new batch


def test_uncommitted_segments_are_ignored_and_removed(tmp_path):
    rng = np.random.default_rng(7)
    store = IndexStore.create(tmp_path / "i", _config())
    _commit(store, ["/a"], _unit(rng, 1), np.zeros((1, 2, 4), np.float16))
    nxt = store.next_row()
    store.tokens.arrays["tokens"].write_segment(nxt, np.ones((3, 2, 4), np.float16))  # a commit that died half way
    shard = tmp_path / "i" / "tokens.zarr" / "tokens" / "c" / str(nxt // 256) / "0" / "0"
    assert shard.is_file()
    (tmp_path / "i" / "faiss" / "seg-000000000001-g2.index").write_bytes(b"half")
    reopened = IndexStore.open(tmp_path / "i", mode="r+")
    assert len(reopened.tokens) == 1 and len(reopened) == 1 and reopened.verify() == []
    with reopened.writing():  # the next writer clears the debris
        pass
    assert not shard.exists()
    assert not (tmp_path / "i" / "faiss" / "seg-000000000001-g2.index").exists()


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(IndexCorrupt, match="no index"):
        IndexStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexCorrupt, match="not an edje-search index"):
        IndexStore.open(tmp_path / "empty")
    IndexStore.create(tmp_path / "c", _config())
    (tmp_path / "c" / "index.json").write_text("{garbage")
    with pytest.raises(IndexCorrupt, match="corrupt"):
        IndexStore.open(tmp_path / "c")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text('{"format_version": 1}')
    with pytest.raises(IndexCorrupt, match="format 1"):
        IndexStore.open(tmp_path / "old")
    assert issubclass(IndexCorrupt, EdjeError)


def test_create_is_atomic_and_never_touches_an_existing_index(tmp_path):
    IndexStore.create(tmp_path / "i", _config())
    marker = (tmp_path / "i" / "index.json").read_bytes()
    with pytest.raises(FileExistsError):
        IndexStore.create(tmp_path / "i", _config(dim=16), populate=lambda d: (d / "model").mkdir())
    assert (tmp_path / "i" / "index.json").read_bytes() == marker and not (tmp_path / "i" / "model").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["i"]  # no temporary folder left behind


def test_commit_needs_the_writer_lock_and_a_second_writer_is_refused(tmp_path):
    store = IndexStore.create(tmp_path / "i", _config())
    with pytest.raises(IndexCorrupt, match="writer lock"):
        store.commit(["/a"], ["h"], np.zeros((1, 8), np.float32), np.zeros((1, 2, 4), np.float16))
    other = IndexStore.open(tmp_path / "i", mode="r+")
    with store.writing():
        with pytest.raises(IndexLocked, match=f"pid {os.getpid()}"):
            with other.writing():
                pass


def test_verify_reports_agreement_and_disagreement(tmp_path):
    rng = np.random.default_rng(3)
    store = IndexStore.create(tmp_path / "i", _config())
    v = _unit(rng, 300)
    _commit(store, [f"/p{i}" for i in range(300)], v, rng.standard_normal((300, 2, 4)).astype(np.float16))
    assert IndexStore.open(tmp_path / "i").verify() == []
    # a stored vector beyond row 256 that no longer matches FAISS
    seg = tmp_path / "i" / "vectors" / "000000000000.npy"
    arr = np.load(seg)
    arr[290] = -arr[290]
    np.save(seg, arr)
    assert any("differ" in p and "290" in p for p in IndexStore.open(tmp_path / "i").verify())


def test_damage_is_found_by_verify_and_fixed_by_repair(tmp_path):
    rng = np.random.default_rng(8)
    store = IndexStore.create(tmp_path / "i", _config(token_shard_rows=16))
    v, t = _unit(rng, 40), rng.standard_normal((40, 2, 4)).astype(np.float16)
    for s in range(0, 40, 10):  # commits at rows 0, 16, 32, 48: one token shard each
        _commit(store, [f"/p{i}" for i in range(s, s + 10)], v[s:s + 10], t[s:s + 10])
    root = tmp_path / "i"
    shards = root / "tokens.zarr" / "tokens" / "c"
    (shards / "1" / "0" / "0").unlink()  # a deleted token shard
    with open(shards / "2" / "0" / "0", "r+b") as f:  # a truncated one
        f.truncate(100)
    problems = IndexStore.open(root).verify()
    assert any("shard file missing" in p for p in problems) and any("truncated" in p for p in problems)
    with pytest.raises(IndexCorrupt, match="missing"):  # never zeros at query time
        IndexStore.open(root).tokens.get([18])
    store = IndexStore.open(root, mode="r+")
    with store.writing():
        report = store.repair()
    assert report.dropped == sorted(f"/p{i}" for i in range(10, 30))
    again = IndexStore.open(root)
    assert again.verify() == [] and len(again) == 20
    np.testing.assert_array_equal(again.tokens.get([53]), t[35:36])
    # a deleted FAISS file: readers and other writers fail clearly, repair rebuilds it from the
    # stored vectors in one commit
    for p in (root / "faiss").glob("seg-*"):
        p.unlink()
    from edje_search.inspection import verify_index
    assert any("FAISS file missing" in p for p in verify_index(root))
    with pytest.raises(IndexCorrupt, match="repair"):
        IndexStore.open(root)
    store = IndexStore.open(root, mode="r+")
    with store.writing(), pytest.raises(IndexCorrupt, match="repair"):
        store.commit(["/new"], ["h"], v[:1], t[:1])
    before = store.generation
    with store.writing():
        assert store.repair().dropped == []
    assert store.generation == before + 1  # one commit: no generation without FAISS
    again = IndexStore.open(root)
    assert again.verify() == [] and len(again) == 20
    _, rows = again.search(v[35:36], 1)
    assert rows[0, 0] == 53


@pytest.mark.parametrize("changed,was,now", [
    ("tokens", '"tokens_per_image": 2', '"tokens_per_image": 3'),
    ("tokens, no zarr.json", '"tokens_per_image": 2', '"tokens_per_image": 3'),
    ("shards, no zarr.json", '"token_shard_rows": 256', '"token_shard_rows": 512'),
    ("vectors", '"dim": 8', '"dim": 9')])
def test_a_writer_refuses_when_index_json_is_what_changed_and_removes_nothing(tmp_path, changed, was, now):
    """Repair would drop every row, and stray-file removal would delete shards of the other
    layout: a writer refuses first, so that restoring index.json gives the whole index back."""
    rng = np.random.default_rng(10)
    store = IndexStore.create(tmp_path / "i", _config())
    _commit(store, ["/a", "/b"], _unit(rng, 2), np.zeros((2, 2, 4), np.float16))
    _commit(store, ["/c", "/d"], _unit(rng, 2), np.ones((2, 2, 4), np.float16))  # rows 256-257: shard 1
    if "no zarr.json" in changed:  # only reading rows can tell the layout
        (tmp_path / "i" / "tokens.zarr" / "tokens" / "zarr.json").unlink()
    files = sorted(p for p in (tmp_path / "i").rglob("*") if p.is_file() and p.name != "zarr.json")
    cfg = tmp_path / "i" / "index.json"
    cfg.write_text(cfg.read_text().replace(was, now))
    broken = IndexStore.open(tmp_path / "i", mode="r+")
    assert broken.verify()
    with pytest.raises(IndexCorrupt, match="restore index.json"):
        with broken.writing():
            broken.repair()
    assert sorted(p for p in (tmp_path / "i").rglob("*") if p.is_file() and p.name != "zarr.json") == files
    cfg.write_text(cfg.read_text().replace(now, was))
    assert IndexStore.open(tmp_path / "i").verify() == [] and len(IndexStore.open(tmp_path / "i")) == 4


def test_threads_sharing_one_writable_store_take_turns(tmp_path):
    import threading

    rng = np.random.default_rng(11)
    store = IndexStore.create(tmp_path / "i", _config())
    v, t = _unit(rng, 80), np.zeros((80, 2, 4), np.float16)
    errors = []

    def writer(first):
        try:
            for i in range(first, first + 40, 4):
                _commit(store, [f"/p{j}" for j in range(i, i + 4)], v[i:i + 4], t[i:i + 4])
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(f,)) for f in (0, 40)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    again = IndexStore.open(tmp_path / "i")
    assert len(again) == 80 and again.verify() == []


def test_folder_lookups_cover_names_of_any_bytes(tmp_path):
    store = IndexStore.create(tmp_path / "i", _config())
    odd = os.fsdecode(b"/photos/\xff\xff\xff\xff\xff\xff\xff\xff\xffz.png")
    paths = [odd, "/photos/a.png", "/photosx/b.png", "/photos/sub/c.png"]
    _commit(store, paths, _unit(np.random.default_rng(12), 4), np.zeros((4, 2, 4), np.float16))
    assert sorted(e.path for e in store.live_under("/photos/")) == sorted([odd, "/photos/a.png", "/photos/sub/c.png"])


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat", "IVF4,Flat", "auto"])
def test_removal_works_for_every_recipe(tmp_path, factory):
    rng = np.random.default_rng(4)
    store = IndexStore.create(tmp_path / "i", _config(factory=factory))
    v = _unit(rng, 400)
    t = rng.standard_normal((400, 2, 4)).astype(np.float16)
    _commit(store, [f"/p{i}" for i in range(400)], v, t)
    with store.writing():
        store.optimize()
    assert store.recipe == ("Flat" if factory == "auto" else factory)
    if factory.startswith("HNSW"):
        assert store.settings["ef_search"] >= 16  # tuned for recall like IVF's nprobe
    _commit(store, [], v[:0], t[:0], removed=[0, 5, 7])
    again = IndexStore.open(tmp_path / "i")
    assert len(again) == 397
    assert again.verify() == []
    _, rows = again.search(v[5:6], 397)
    assert 5 not in rows[0].tolist() and 0 not in rows[0].tolist()


def test_segments_merge_and_recipes_retrain_as_the_index_grows(tmp_path, monkeypatch):
    from edje_search.storage import compaction
    monkeypatch.setattr(vector_index, "FLAT_BELOW", 500)  # a small index stands in for 100k vectors
    rng = np.random.default_rng(9)
    centers = _unit(rng, 20, 16)
    v = centers[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 16)).astype(np.float32)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    t = np.zeros((2000, 2, 4), np.float16)
    store = IndexStore.create(tmp_path / "i", _config(dim=16, factory="auto"))
    for s in range(0, 400, 25):  # 16 small commits: merged in runs of MERGE_FANOUT
        _commit(store, [f"/p{i}" for i in range(s, s + 25)], v[s:s + 25], t[s:s + 25])
    with store.writing():
        assert store.optimize()["action"] == "merge"
    assert len(store.faiss_segments) < 16 and store.recipe == "Flat" and store.verify() == []
    _commit(store, [f"/p{i}" for i in range(400, 2000)], v[400:], t[400:])
    with store.writing():
        done = store.optimize()
    assert done["action"] == "retrain" and store.recipe.startswith("IVF") and store.settings["nprobe"] >= 1
    assert done["recall_at_10"] >= compaction.TARGET_RECALL
    _commit(store, ["/late"], v[:1], t[:1])  # new rows are encoded with the trained recipe
    reopened = IndexStore.open(tmp_path / "i")
    assert reopened.verify() == [] and len(reopened) == 2001
    q = v[rng.choice(2000, 50, replace=False)]
    _, rows = reopened.search(q, 10)
    which = {e.row: 2000 if e.path == "/late" else int(e.path[2:]) for e in reopened.entries}
    got = np.vectorize(which.get)(rows)  # the vector each hit's row holds (rows skip between commits)
    truth = vector_index.exact_top_k(np.concatenate([v, v[:1]]), q, 10)
    recall = np.mean([len(set(g) & set(tr)) / 10 for g, tr in zip(got.tolist(), truth.tolist())])
    assert recall >= 0.9


def test_remote_store_url_must_be_a_url(tmp_path):
    with pytest.raises(BadInput, match="not a URL"):
        IndexStore.create(tmp_path / "i", _config(store_url="some/folder"))


def test_both_row_stores_offer_what_the_index_store_asks_of_them(tmp_path):
    """Vectors (.npy segments) and tokens (Zarr arrays) answer the same RowArray protocol."""
    from edje_search.storage.rows import RowArray

    store = IndexStore.create(tmp_path / "i", _config(token_dtype="int8"))
    assert set(store.arrays) == {"vectors", "tokens", "token_scales"}
    for arr in store.arrays.values():
        assert isinstance(arr, RowArray), type(arr).__name__

"""Token stores, the FAISS wrapper and atomic index commits."""
from __future__ import annotations

import numpy as np
import pytest

from edje_search.config import IndexConfig
from edje_search.storage import vector_index
from edje_search.storage.index_store import IndexError_, IndexStore
from edje_search.storage.token_store import (Int8ZarrTokenStore, MemoryTokenStore, TokenStore, ZarrTokenStore,
                                             bytes_per_image, create_token_store, open_token_store,
                                             quantize_per_token)


@pytest.mark.parametrize("make", ["zarr", "memory"])
def test_token_store_round_trip_is_exact(tmp_path, make):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((37, 4, 8)).astype(np.float16)
    store = ZarrTokenStore.create(tmp_path / "t.zarr", 4, 8, chunk_rows=5) if make == "zarr" else MemoryTokenStore(4, 8)
    assert isinstance(store, TokenStore)
    store.write(0, data[:20])
    store.write(20, data[20:])
    if make == "zarr":
        store = ZarrTokenStore.open(tmp_path / "t.zarr")
    assert len(store) == 37
    rows = np.array([36, 0, 5, 5, 19, 20])
    got = store.get(rows)
    assert got.dtype == np.float16 and got.shape == (6, 4, 8)
    assert np.array_equal(got, data[rows])
    with pytest.raises(IndexError):
        store.get([37])


def test_zarr_truncate_and_overwrite(tmp_path):
    store = ZarrTokenStore.create(tmp_path / "t.zarr", 2, 3, chunk_rows=4)
    store.write(0, np.ones((10, 2, 3), np.float16))
    store.truncate(6)
    assert len(store) == 6
    store.write(6, np.full((2, 2, 3), 7, np.float16))
    assert np.array_equal(store.get([5, 6, 7])[:, 0, 0], np.array([1, 7, 7], np.float16))


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
    store = create_token_store(tmp_path / "t.zarr", 64, 384, dtype="int8", chunk_rows=8)
    assert isinstance(store, TokenStore)
    store.write(0, data[:10])
    store.write(10, data[10:])
    store = open_token_store(tmp_path / "t.zarr", mode="r+")
    assert isinstance(store, Int8ZarrTokenStore) and len(store) == 23
    assert store._q._raw_layout and store._scale._raw_layout  # both read by pread, not through zarr
    rows = np.array([22, 0, 9, 9, 10])
    q, scale = quantize_per_token(data[rows])
    np.testing.assert_array_equal(store.get(rows), q.astype(np.float32) * scale.astype(np.float32))
    store.truncate(12)
    assert len(open_token_store(tmp_path / "t.zarr")) == 12
    assert bytes_per_image(64, 384, "int8") == 24_704 <= 25_000
    assert bytes_per_image(64, 384, "float16") == 49_152
    chunk_files = [p for p in (tmp_path / "t.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert sum(p.stat().st_size for p in chunk_files) == 16 * 24_704  # 2 chunks of 8 rows after truncating to 12
    with pytest.raises(ValueError, match="token dtype"):
        create_token_store(tmp_path / "u.zarr", 2, 2, dtype="int4")


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
                model_path="m", model_fingerprint="f", chunk_rows=4)
    return IndexConfig(**{**base, **kw})


def test_index_store_commit_reopen_and_remove(tmp_path):
    rng = np.random.default_rng(2)
    store = IndexStore.create(tmp_path / "i", _config())
    v = rng.standard_normal((6, 8)).astype(np.float32)
    t = rng.standard_normal((6, 2, 4)).astype(np.float16)
    store.commit([f"/p{i}" for i in range(6)], [f"h{i}" for i in range(6)], v, t)
    store.commit([], [], v[:0], t[:0], removed_rows=[1, 3])
    assert store.path_of_row == {0: "/p0", 2: "/p2", 4: "/p4", 5: "/p5"}  # follows each commit
    again = IndexStore.open(tmp_path / "i")
    assert [e.path for e in again.entries] == ["/p0", "/p2", "/p4", "/p5"]
    assert again.path_of_row == store.path_of_row
    assert again.faiss.ntotal == 4
    assert np.array_equal(again.tokens.get([4]), t[4:5])
    np.testing.assert_array_equal(again.vectors([5]), v[5:6])
    assert sorted(p.name for p in (tmp_path / "i").glob("faiss-*")) == ["faiss-2.index"]


def test_uncommitted_rows_are_ignored_and_dropped(tmp_path):
    store = IndexStore.create(tmp_path / "i", _config())
    z = np.zeros
    store.commit(["/a"], ["h"], z((1, 8), np.float32), z((1, 2, 4), np.float16))
    store.tokens.write(1, np.ones((3, 2, 4), np.float16))  # a commit that died half way
    reopened = IndexStore.open(tmp_path / "i", mode="r+")
    assert len(reopened.tokens) == 1 and len(reopened) == 1


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(IndexError_, match="no index"):
        IndexStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexError_, match="not an edje-search index"):
        IndexStore.open(tmp_path / "empty")
    IndexStore.create(tmp_path / "c", _config())
    (tmp_path / "c" / "state.json").write_text("{garbage")
    with pytest.raises(IndexError_, match="corrupt"):
        IndexStore.open(tmp_path / "c")


def test_verify_reports_agreement_and_disagreement(tmp_path):
    rng = np.random.default_rng(3)
    store = IndexStore.create(tmp_path / "i", _config())
    v = rng.standard_normal((5, 8)).astype(np.float32)
    store.commit([f"/p{i}" for i in range(5)], ["h"] * 5, v, rng.standard_normal((5, 2, 4)).astype(np.float16))
    assert IndexStore.open(tmp_path / "i").verify() == []
    broken = IndexStore.open(tmp_path / "i")
    broken.faiss.remove_ids(np.array([2], dtype=np.int64))
    assert any("FAISS holds 4" in p for p in broken.verify())


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat", "IVF4,Flat"])
def test_removal_works_for_every_recipe(tmp_path, factory):
    rng = np.random.default_rng(4)
    store = IndexStore.create(tmp_path / "i", _config(factory=factory))
    v = rng.standard_normal((40, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = rng.standard_normal((40, 2, 4)).astype(np.float16)
    store.commit([f"/p{i}" for i in range(40)], ["h"] * 40, v, t)
    store.commit([], [], v[:0], t[:0], removed_rows=[0, 5, 7])
    again = IndexStore.open(tmp_path / "i")
    assert again.faiss.ntotal == 37 and len(again) == 37
    assert again.verify() == []
    _, rows = vector_index.search(again.faiss, v[5:6], 37)
    assert 5 not in rows[0].tolist() and 0 not in rows[0].tolist()


def test_raw_gather_equals_zarr_gather(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((50, 3, 5)).astype(np.float16)
    store = ZarrTokenStore.create(tmp_path / "t.zarr", 3, 5, chunk_rows=7)
    store.write(0, data)
    store = ZarrTokenStore.open(tmp_path / "t.zarr")
    assert store._raw_layout
    rows = rng.integers(0, 50, 30)
    assert np.array_equal(store._gather_raw(rows), data[rows])
    store._raw_layout = False
    assert np.array_equal(store.get(rows), data[rows])

"""Damaged stored bytes are caught: checksums per segment and per row, NaN refused and found."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from edje_search.config import IndexConfig
from edje_search.errors import BadInput
from edje_search.storage.index_store import IndexStore
from edje_search.storage.integrity import unchecked_segments
from tests.damage import flip_row_bytes, write_rows_behind_the_index

SHARD = 16  # token rows per shard here: commit c of ten rows starts at row 16 * c


def _row(i: int) -> int:
    """The row of /p{i} (commits of ten rows, each starting at a shard boundary)."""
    return (i // 10) * SHARD + i % 10


def _config(**kw):
    base = dict(factory="Flat", dim=8, tokens_per_image=2, token_width=4, token_dtype="float16",
                token_shard_rows=SHARD, model_path="m", model_fingerprint="f")
    return IndexConfig(**{**base, **kw})


def _build(root, token_dtype="float16", **config):
    """40 rows in four commits of 10; returns (vectors, tokens)."""
    rng = np.random.default_rng(8)
    store = IndexStore.create(root, _config(token_dtype=token_dtype, **config))
    v = rng.standard_normal((40, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = rng.standard_normal((40, 2, 4)).astype(np.float16)
    for s in range(0, 40, 10):
        with store.writing():
            store.commit([f"/p{i}" for i in range(s, s + 10)], ["h"] * 10, v[s:s + 10], t[s:s + 10])
    return v, t


def _flip(path, n, seed, rows_of=None):
    """XOR ``n`` random data bytes of an .npy segment; returns the rows they fall in."""
    arr = np.load(path, mmap_mode="r")
    offset = path.stat().st_size - arr.nbytes
    row_bytes = arr.nbytes // arr.shape[0]
    rng = np.random.default_rng(seed)
    where = rng.choice(arr.nbytes, size=n, replace=False)
    data = bytearray(path.read_bytes())
    for w in where:
        data[offset + int(w)] ^= 0xFF
    path.write_bytes(bytes(data))
    return sorted({int(w) // row_bytes for w in where})


def _repair(root):
    store = IndexStore.open(root, mode="r+")
    with store.writing():
        return store.repair()


def test_flipped_token_bytes_fail_verify_and_repair_drops_exactly_those_rows(tmp_path):
    root = tmp_path / "i"
    v, t = _build(root)
    assert IndexStore.open(root).verify() == [] and unchecked_segments(IndexStore.open(root)) == []
    hit = [11, 14, 18]
    flip_row_bytes(root, [_row(i) for i in hit], SHARD)
    problems = IndexStore.open(root).verify()
    assert len(problems) == 1 and "tokens segment" in problems[0] and "CRC-32C" in problems[0]
    assert "3 rows damaged (17, 20, 24)" in problems[0]
    report = _repair(root)
    assert report.dropped == [f"/p{i}" for i in hit]
    again = IndexStore.open(root)
    assert again.verify() == [] and len(again) == 40 - len(hit)
    keep = [i for i in range(10, 20) if i not in hit]
    np.testing.assert_array_equal(again.tokens.get([_row(i) for i in keep]), t[keep])  # the span's intact rows stay
    _, got = again.search(v[hit[0]:hit[0] + 1], 40)
    assert _row(hit[0]) not in got[0].tolist()


def test_flipped_vector_bytes_are_dropped_never_rebuilt_into_faiss(tmp_path):
    root = tmp_path / "i"
    v, _ = _build(root)
    hit = _flip(root / "vectors" / f"{_row(20):012d}.npy", 3, seed=2)
    ids = [20 + r for r in hit]
    problems = IndexStore.open(root).verify()
    assert any("vectors segment" in p and "fails its checksum" in p for p in problems)
    report = _repair(root)
    assert report.dropped == sorted(f"/p{i}" for i in ids)
    again = IndexStore.open(root)
    assert again.verify() == []
    _, got = again.search(v, 1)  # every intact row is still its own nearest neighbour
    assert [int(got[i, 0]) for i in range(40) if i not in ids] == [_row(i) for i in range(40) if i not in ids]
    assert not set(got[:, 0].tolist()) & {_row(i) for i in ids}


@pytest.mark.parametrize("store_name", ["vectors", "tokens"])
def test_nan_written_into_a_segment_is_found_and_its_rows_dropped(tmp_path, store_name):
    root = tmp_path / "i"
    _build(root)
    rows = [_row(32), _row(37)]
    if store_name == "vectors":
        seg = root / "vectors" / f"{_row(30):012d}.npy"
        arr = np.load(seg)
        arr[[2, 7]] = np.nan
        np.save(seg, arr)
    else:
        write_rows_behind_the_index(IndexStore.open(root), rows, np.full((2, 2, 4), np.nan))
    problems = IndexStore.open(root).verify()
    assert any("NaN" in p and str(rows[0]) in p and str(rows[1]) in p for p in problems)
    assert _repair(root).dropped == ["/p32", "/p37"]
    assert IndexStore.open(root).verify() == []


def test_segments_without_checksums_are_unchecked_not_broken(tmp_path):
    """An index written before checksums: verify is ok and names the unchecked segments; NaN in
    them is still found, and a vector that disagrees with FAISS is dropped, not trusted."""
    root = tmp_path / "i"
    v, _ = _build(root)
    with sqlite3.connect(root / "manifest.sqlite") as db:
        db.execute("DROP TABLE segment_checksums")
    old = IndexStore.open(root)
    assert old.verify() == [] and len(unchecked_segments(old)) == 8
    seg = root / "vectors" / "000000000000.npy"
    arr = np.load(seg)
    arr[4] = -arr[4]
    arr[5] = np.inf
    np.save(seg, arr)
    problems = IndexStore.open(root).verify()
    assert any("NaN" in p and "(5)" in p for p in problems) and any("differ" in p for p in problems)
    assert _repair(root).dropped == ["/p4", "/p5"]
    again = IndexStore.open(root)
    assert again.verify() == [] and len(again) == 38
    assert len(unchecked_segments(again)) == 7  # the repaired segment was written again, with checksums


@pytest.mark.parametrize("chunk_rows", [0, 1], ids=["a-chunk-per-shard", "a-chunk-per-row"])
def test_int8_token_scales_are_checksummed_too(tmp_path, chunk_rows):
    """Scales chunked a shard at a time (new indexes) lose every row of the shard's chunk to one
    changed byte; chunked a row at a time (indexes from before) only the row."""
    root = tmp_path / "i"
    _build(root, token_dtype="int8", token_scale_chunk_rows=chunk_rows)
    flip_row_bytes(root, [1, 6], SHARD, array="token_scales", at=1)
    problems = IndexStore.open(root).verify()
    if chunk_rows == 1:
        assert any("token_scales segment" in p and "rows damaged (1, 6)" in p for p in problems)
        assert _repair(root).dropped == ["/p1", "/p6"]
    else:
        assert any("token_scales segment" in p and "10 rows damaged (0, 1," in p for p in problems), problems
        assert _repair(root).dropped == sorted(f"/p{i}" for i in range(10))
    assert IndexStore.open(root).verify() == []


def test_commit_refuses_non_finite_vectors_and_tokens(tmp_path):
    store = IndexStore.create(tmp_path / "i", _config())
    v = np.ones((3, 8), np.float32)
    t = np.ones((3, 2, 4), np.float16)
    v[1, 3] = np.nan
    with store.writing(), pytest.raises(BadInput, match=r"/b: its vectors hold NaN"):
        store.commit(["/a", "/b", "/c"], ["h"] * 3, v, t)
    v[1, 3] = 1
    t[2, 0, 0] = np.inf
    with store.writing(), pytest.raises(BadInput, match=r"/c: its tokens hold NaN or infinite"):
        store.commit(["/a", "/b", "/c"], ["h"] * 3, v, t)
    assert len(IndexStore.open(tmp_path / "i")) == 0 and not (tmp_path / "i" / "vectors").exists()


def test_cli_verify_and_repair_on_a_built_index(built_index):
    """The attack through the command line: token bytes flipped in two rows and NaN written into
    a third row's vector; verify fails naming them, repair drops exactly those three files."""
    from click.testing import CliRunner

    from edje_search_cli.main import cli, register_commands

    register_commands()
    flip_row_bytes(built_index, [3, 17])
    vectors = sorted((built_index / "vectors").glob("*.npy"))[0]
    v = np.load(vectors)
    v[25, 0] = np.nan
    np.save(vectors, v)
    before = IndexStore.open(built_index)
    damaged = sorted(before.paths([3, 17, 25]).values())
    runner = CliRunner()
    verify = runner.invoke(cli, ["verify", "--index", str(built_index)])
    assert verify.exit_code == 1
    assert "rows damaged (3, 17)" in verify.output and "NaN" in verify.output and "(25)" in verify.output
    repair = runner.invoke(cli, ["repair", "--index", str(built_index), "--json"])
    assert repair.exit_code == 0, repair.output
    assert json.loads(repair.stdout)["dropped"] == damaged
    assert runner.invoke(cli, ["verify", "--index", str(built_index)]).exit_code == 0
    assert len(IndexStore.open(built_index)) == 37


def test_a_full_disk_while_writing_faiss_is_one_line_naming_the_file(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    import os

    from edje_search.storage import vector_index

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    index = vector_index.new_segment_index("Flat", 8)
    index.add_with_ids(np.ones((5000, 8), np.float32), np.arange(5000))
    with pytest.raises(OSError) as caught:
        vector_index.write_index(index, "/dev/full")
    assert str(caught.value) == "[Errno 28] No space left on device: '/dev/full'"


def test_a_query_reading_nan_tokens_fails_instead_of_reordering_silently(built_index):
    from edje_search import Engine
    from edje_search.errors import IndexCorrupt

    store = IndexStore.open(built_index)
    rows = [e.row for e in store.entries]  # every row: whichever the query reranks
    write_rows_behind_the_index(store, rows, np.full((len(rows), *store.tokens.arrays["tokens"].row_shape), np.nan))
    with pytest.raises(IndexCorrupt, match=r"stored tokens of rows \[.*hold NaN"):
        IndexStore.open(built_index).tokens.get([0, 1])
    with pytest.raises(IndexCorrupt, match="hold NaN or infinite values"):
        Engine.from_pretrained(built_index).search("a red circle", k=3, rerank_k=5)

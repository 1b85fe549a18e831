"""The token store is a plain Zarr v3 group: other readers get the engine's tokens, damage to a
shard is found and repaired, and indexes of the previous release migrate without losing a row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edje_search.config import IndexConfig
from edje_search.errors import IndexCorrupt, IndexOutdated
from edje_search.storage import layout
from edje_search.storage.index_store import IndexStore
from edje_search.storage.migrate import migrate
from edje_search.storage.token_store import dequantize, quantize_per_token
from tests.damage import flip_row_bytes, shard_file, shifted_shard

LEGACY = Path(__file__).parents[1] / "data" / "index-0.2"
SHARD = 64


def build_random_index(root, token_dtype, commits=(110, 110, 110), seed=0, store_url="", scale_chunk_rows=SHARD):
    """An index of random rows in a few commits (gaps between them); returns (store, tokens by row).
    ``scale_chunk_rows=1``: int8 scales one row per chunk, as indexes made before store them."""
    rng = np.random.default_rng(seed)
    store = IndexStore.create(root, IndexConfig(dim=8, tokens_per_image=4, token_width=16, token_dtype=token_dtype,
                                                token_shard_rows=SHARD, factory="Flat", model_fingerprint="fp",
                                                store_url=store_url, token_scale_chunk_rows=scale_chunk_rows))
    by_row, n = {}, 0
    for b in commits:
        v = rng.standard_normal((b, 8)).astype(np.float32)
        t = (rng.standard_normal((b, 4, 16)) * rng.uniform(0.1, 4, (b, 4, 1))).astype(np.float16)
        with store.writing():
            start = store.next_row()
            store.commit([f"/img{n + i}.jpg" for i in range(b)], [None] * b, v / np.linalg.norm(v, axis=1)[:, None], t)
        by_row.update({start + i: t[i] for i in range(b)})
        n += b
    return store, by_row


def zarr_tokens(group_path, rows, storage_options=None):
    """What a plain zarr-python reader computes from the group and its documented attributes."""
    import zarr

    group = zarr.open_group(str(group_path), mode="r", storage_options=storage_options)
    attrs = group.attrs["edje_search"]
    uniq, inverse = np.unique(rows, return_inverse=True)
    tokens = np.asarray(group["tokens"].oindex[uniq])[inverse]
    if attrs["dtype"] == "int8":
        return tokens.astype(np.float32) * np.asarray(group["token_scales"].oindex[uniq])[inverse].astype(np.float32)
    return tokens


def tensorstore_tokens(kvstore: dict, rows):
    """What a plain tensorstore reader gets, given the group's key-value store spec."""
    import tensorstore as ts

    def read(name):
        spec = dict(kvstore, path=f"{kvstore['path'].rstrip('/')}/{name}/")
        return ts.open({"driver": "zarr3", "kvstore": spec}).result()[rows].read().result()

    tokens = read("tokens")
    if tokens.dtype == np.int8:
        return tokens.astype(np.float32) * read("token_scales").astype(np.float32)
    return tokens


@pytest.mark.parametrize("token_dtype,scale_chunk_rows", [("float16", SHARD), ("int8", SHARD), ("int8", 1)])
def test_zarr_python_and_tensorstore_read_the_tokens_the_engine_gathers(tmp_path, token_dtype, scale_chunk_rows):
    store, by_row = build_random_index(tmp_path / "i", token_dtype, scale_chunk_rows=scale_chunk_rows)
    rows = np.random.default_rng(1).choice(sorted(by_row), 100, replace=False)
    engine_view = IndexStore.open(tmp_path / "i").tokens.get(rows)
    group = tmp_path / "i" / "tokens.zarr"
    np.testing.assert_array_equal(zarr_tokens(group, rows), engine_view)
    np.testing.assert_array_equal(tensorstore_tokens({"driver": "file", "path": str(group)}, rows), engine_view)
    if token_dtype == "float16":
        np.testing.assert_array_equal(engine_view, np.stack([by_row[r] for r in rows]))
    # what a rerank scores (stored tokens cast by torch) is exactly the dequantised gather
    from edje_search.ranking import float_tensor

    np.testing.assert_array_equal(float_tensor(IndexStore.open(tmp_path / "i").tokens.read(rows)).numpy(),
                                  engine_view.astype(np.float32))
    import zarr

    group_meta = zarr.open_group(str(group), mode="r")
    assert group_meta["tokens"].shape == (store.n_rows, 4, 16)
    assert group_meta.attrs["edje_search"]["model_fingerprint"] == "fp"


def test_a_built_index_is_readable_by_zarr_too(built_index):
    from edje_search import Engine

    engine = Engine.from_pretrained(built_index)
    rows = np.array([e.row for e in engine.store.entries])
    np.testing.assert_array_equal(zarr_tokens(built_index / "tokens.zarr", rows), engine.store.tokens.get(rows))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _overwrite_index(path):
    data = bytearray(path.read_bytes())
    data[-40:-4] = bytes(36)  # entries of the shard index, its own CRC left as it was
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [Path.unlink, _truncate, _overwrite_index],
                         ids=["deleted", "truncated", "index-overwritten"])
@pytest.mark.parametrize("array", ["tokens", "token_scales"])
def test_a_damaged_shard_fails_verify_and_repair_drops_exactly_its_rows(tmp_path, damage, array):
    store, by_row = build_random_index(tmp_path / "i", "float16" if array == "tokens" else "int8")
    if array == "token_scales":
        by_row = {r: dequantize(*quantize_per_token(t)) for r, t in by_row.items()}
    second = sorted(by_row)[110]  # the second commit: rows 128-237, shards 2 and 3
    hit = shard_file(tmp_path / "i", second + SHARD, SHARD, array)  # shard 3: rows 192-237
    intact = shard_file(tmp_path / "i", second, SHARD, array)  # shard 2, the same commit's first shard
    before = (intact.stat().st_ino, intact.stat().st_mtime_ns)
    damage(hit)
    problems = IndexStore.open(tmp_path / "i").verify()
    assert problems and any(f"{array} segment" in p and "rows 128-237" in p for p in problems)
    writer = IndexStore.open(tmp_path / "i", mode="r+")
    with writer.writing():
        report = writer.repair()
    lost = range(192, 238)
    assert report.dropped == sorted(f"/img{110 + r - 128}.jpg" for r in lost)
    again = IndexStore.open(tmp_path / "i")
    assert again.verify() == [] and len(again) == 330 - len(lost)
    keep = [r for r in sorted(by_row) if r not in lost]
    np.testing.assert_array_equal(again.tokens.get(keep), np.stack([by_row[r] for r in keep]))
    assert (intact.stat().st_ino, intact.stat().st_mtime_ns) == before  # only the damaged shard was replaced
    assert "c/3/0/0" in " ".join(report.damaged) and "c/2/0/0" not in " ".join(report.damaged)


def test_a_changed_byte_in_int8_scales_loses_the_rows_their_chunk_covers(tmp_path):
    """int8 scales are one chunk per shard: a changed byte fails the chunk's CRC-32C and loses
    every live row of that shard (tokens, a chunk per row, lose only the row)."""
    build_random_index(tmp_path / "i", "int8")
    flip_row_bytes(tmp_path / "i", [200], SHARD, "token_scales", at=1)  # shard 3: rows 192-237 live
    problems = IndexStore.open(tmp_path / "i").verify()
    assert any("token_scales segment" in p and "46 rows damaged (192, 193," in p for p in problems), problems
    writer = IndexStore.open(tmp_path / "i", mode="r+")
    with writer.writing():
        assert len(writer.repair().dropped) == 238 - 192
    again = IndexStore.open(tmp_path / "i")
    assert again.verify() == [] and len(again) == 330 - (238 - 192)


def test_a_reader_holding_shard_indexes_reads_shards_replaced_after_it_cached_them(tmp_path):
    """Readers keep the shard indexes they read; a shard replaced behind them (by repair, or
    here by the same rows in another layout) is read through its new index, never the old one."""
    store, by_row = build_random_index(tmp_path / "i", "float16")
    reader = IndexStore.open(tmp_path / "i")
    rows = [r for r in sorted(by_row) if 192 <= r < 238]  # shard 3
    np.testing.assert_array_equal(reader.tokens.get(rows), np.stack([by_row[r] for r in rows]))
    path = shard_file(tmp_path / "i", 192, SHARD)
    path.write_bytes(shifted_shard(path.read_bytes(), SHARD))
    # the reader's cached index points at the old offsets: the wrong bytes would fail their CRC
    np.testing.assert_array_equal(reader.tokens.get(rows), np.stack([by_row[r] for r in rows]))
    # a shard found missing by a new reader, then put back (a restore from backup): the cached
    # "missing" would stand, but the retry of a failed read reopens the array, which checks it
    saved = path.read_bytes()
    path.unlink()
    late = IndexStore.open(tmp_path / "i")
    with pytest.raises(IndexCorrupt):
        late.tokens.get(rows)
    path.write_bytes(saved)
    stale = late.tokens.arrays["tokens"].handle
    np.testing.assert_array_equal(late.tokens.get(rows), np.stack([by_row[r] for r in rows]))
    assert late.tokens.arrays["tokens"].handle is not stale  # the retry's handle read: it is kept
    # one row damaged: reads of it fail without replacing the shared handle (its cache stays)
    flip_row_bytes(tmp_path / "i", [200], SHARD)
    held = reader.tokens.arrays["tokens"].handle
    with pytest.raises(IndexCorrupt, match="repair"):
        reader.tokens.get(rows)
    assert reader.tokens.arrays["tokens"].handle is held
    # then repaired by another writer: the reader reads the kept rows of the replaced shard
    writer = IndexStore.open(tmp_path / "i", mode="r+")
    with writer.writing():
        assert len(writer.repair().dropped) == 1
    keep = [r for r in rows if r != 200]
    np.testing.assert_array_equal(reader.tokens.get(keep), np.stack([by_row[r] for r in keep]))


def test_a_failure_of_access_is_an_error_never_damage(tmp_path):
    """Only missing, cut-short or undecodable bytes make rows lost; a refused or failed read
    stops verify and repair instead of dropping rows."""
    from edje_search.errors import StorageUnavailable
    from edje_search.storage.zarr_io import _why
    from edje_search.storage.zarr_rows import ZarrRows, damage_reason

    assert _why(ValueError("DATA_LOSS: Error reading shard index in local file: Digest mismatch")) == \
        "shard truncated or its index damaged"
    assert _why(ValueError('NOT_FOUND: chunk {4, 0, 0} stored at shard entry is missing')) == "shard file missing"
    (tmp_path / "index.json").write_text("{}")  # the index is there: its storage refuses the read
    for refused in ("PERMISSION_DENIED: HTTP response code: 403", "UNAVAILABLE: connection reset",
                    "DEADLINE_EXCEEDED: timed out"):
        assert _why(ValueError(refused)) is None
        with pytest.raises(StorageUnavailable, match="check access to the storage"):
            damage_reason(ZarrRows(f"{tmp_path}/tokens.zarr/tokens", (2, 3), "float16", 8), ValueError(refused))


class _Refused:
    """A tensorstore array whose every read the storage refuses (as S3 answers 403)."""

    def __getitem__(self, rows):
        return self

    def read(self):
        return self

    def result(self):
        raise ValueError("PERMISSION_DENIED: Error reading: HTTP response code: 403")


@pytest.mark.parametrize("refuse", ["tokens", "vectors"])
def test_a_read_the_storage_refuses_stops_queries_verify_and_repair_without_dropping_a_row(tmp_path, monkeypatch,
                                                                                             refuse):
    from edje_search.errors import StorageUnavailable
    from edje_search.storage import segments

    build_random_index(tmp_path / "i", "int8")
    if refuse == "tokens":
        from edje_search.storage.zarr_rows import ZarrRows

        monkeypatch.setattr(ZarrRows, "_open_handle", lambda self: _Refused())
    else:
        def refused(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(segments.np, "load", refused)
    store = IndexStore.open(tmp_path / "i", mode="r+")
    if refuse == "tokens":
        with pytest.raises(StorageUnavailable, match="nothing stored is known to be damaged"):
            store.tokens.get([0, 1])
    else:
        with pytest.raises(StorageUnavailable, match="nothing stored is known to be damaged"):
            store.vectors([0, 1])
    with pytest.raises(StorageUnavailable):
        store.verify()
    with pytest.raises(StorageUnavailable):
        with store.writing():  # a writer checks the stored layout first: a refused read stops it there
            store.repair()
    monkeypatch.undo()
    again = IndexStore.open(tmp_path / "i")
    assert len(again) == 330 and again.verify() == []


def test_a_query_whose_read_the_storage_refuses_is_not_sent_to_repair(tmp_path):
    """At query time a refused read is StorageUnavailable (no repair advice); damage is IndexCorrupt."""
    from edje_search.errors import StorageUnavailable
    from edje_search.storage.zarr_rows import read_failure

    store, _ = build_random_index(tmp_path / "i", "float16", commits=(10,))
    refused = read_failure(store.tokens.arrays["tokens"], ValueError("PERMISSION_DENIED: HTTP response code: 403"))
    assert isinstance(refused, StorageUnavailable) and "repair" not in str(refused)
    assert "PERMISSION_DENIED" in str(refused) and "nothing stored is known to be damaged" in str(refused)
    rows = store.tokens.arrays["tokens"]
    damaged = read_failure(rows, ValueError("DATA_LOSS: Error reading shard index: Digest mismatch"))
    assert type(damaged) is IndexCorrupt and "repair" in str(damaged)


def test_a_store_url_the_token_store_cannot_reach_is_refused_at_creation(tmp_path):
    from edje_search.errors import BadInput

    with pytest.raises(BadInput, match="only s3:// and gs://"):
        build_random_index(tmp_path / "i", "float16", store_url="az://container/prefix")
    assert not (tmp_path / "i").exists()


def test_zarr_json_lagging_after_a_crash_is_published_by_the_next_writer(tmp_path):
    store, _ = build_random_index(tmp_path / "i", "float16", commits=(10,))
    meta = tmp_path / "i" / "tokens.zarr" / "tokens" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"][0] = 0  # as if the process died between the manifest commit and publishing
    meta.write_text(json.dumps(doc))
    with IndexStore.open(tmp_path / "i", mode="r+").writing():
        pass
    assert json.loads(meta.read_text())["shape"][0] == 10


def _legacy_copy(tmp_path, dtype, model_dir=None):
    """A copy of an index 0.2 built; ``model_dir``: where its model lives here (the fixture names
    the folder it was built with, which only existed on that machine)."""
    shutil.copytree(LEGACY / dtype, tmp_path / dtype)
    if model_dir is not None:
        config = tmp_path / dtype / "index.json"
        config.write_text(json.dumps(dict(json.loads(config.read_text()), model_path=str(model_dir)), indent=2))
    return tmp_path / dtype


def _legacy_tokens(index_dir, dtype):
    """Every row's tokens as 0.2 stored them (read with numpy, dequantised for int8)."""
    segs = sorted((index_dir / "tokens").glob("*.npy"))
    tokens = np.concatenate([np.load(p) for p in segs])
    if dtype == "int8":
        scales = np.concatenate([np.load(p) for p in sorted((index_dir / "token_scales").glob("*.npy"))])
        return tokens.astype(np.float32) * scales.astype(np.float32)
    return tokens


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_an_index_of_the_previous_release_migrates_without_losing_a_row(tmp_path, tiny_model_dir, dtype):
    from click.testing import CliRunner

    from edje_search import Engine, load_model
    from edje_search_cli.main import cli

    index_dir = _legacy_copy(tmp_path, dtype, model_dir=tiny_model_dir)
    expected = json.loads((LEGACY / "expected.json").read_text())[dtype]
    old_tokens = _legacy_tokens(index_dir, dtype)
    with pytest.raises(IndexOutdated, match="edje-search migrate --index"):
        IndexStore.open(index_dir)
    result = CliRunner().invoke(cli, ["migrate", "--index", str(index_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["migrated"] and report["rows"] == 12 and report["dropped"] == [] and report["problems"] == []
    assert not (index_dir / "tokens").exists() and not (index_dir / "token_scales").exists()

    model = load_model(tiny_model_dir)
    assert model.fingerprint() == expected["fingerprint"]
    engine = Engine.from_pretrained(index_dir, model=model)
    assert {Path(e.path).name: e.row for e in engine.store.entries} == expected["rows"]
    rows = np.arange(12)
    np.testing.assert_array_equal(engine.store.tokens.get(rows), old_tokens)
    for q, want in expected["hits"].items():
        got = [[Path(h.path).name, round(h.score, 4)] for h in engine.search(q, k=5, rerank_k=8)]
        assert got == want
    # a current index: migrate again is a no-op, and new commits start at the next shard
    assert json.loads(CliRunner().invoke(cli, ["migrate", "--index", str(index_dir), "--json"]).stdout)[
        "migrated"] is False
    writer = IndexStore.open(index_dir, mode="r+")
    assert writer.next_row() == 256


def test_rows_damaged_before_the_migration_are_dropped_by_it(tmp_path):
    index_dir = _legacy_copy(tmp_path, "float16")
    seg = sorted((index_dir / "tokens").glob("*.npy"))[0]
    arr = np.load(seg)
    arr[3, 0, 0] += 1  # a changed byte in row 3 that 0.2's row checksum recorded before
    np.save(seg, arr)
    report = migrate(index_dir)
    assert [Path(p).name for p in report.dropped] == [n for n, r in json.loads(
        (LEGACY / "expected.json").read_text())["float16"]["rows"].items() if r == 3]
    again = IndexStore.open(index_dir)
    assert again.verify() == [] and len(again) == 10 and 3 in again.tombstones.tolist()
    # and a 0.2 index whose token folder is gone is not "migrated" to nothing
    other = _legacy_copy(tmp_path / "b", "int8")
    shutil.rmtree(other / "tokens")
    with pytest.raises(Exception, match="is missing"):
        migrate(other)


@pytest.mark.parametrize("point", ["migrate_after_copy", "migrate_after_commit"])
def test_a_migration_killed_part_way_leaves_a_whole_index(tmp_path, monkeypatch, point):
    index_dir = _legacy_copy(tmp_path, "int8")
    old_tokens = _legacy_tokens(index_dir, "int8")

    def crash(name):
        if name == point:
            raise SystemExit(137)

    monkeypatch.setattr(layout, "fault", crash)
    with pytest.raises(SystemExit):
        migrate(index_dir)
    monkeypatch.setattr(layout, "fault", lambda name: None)
    if point == "migrate_after_copy":  # before the commit: still the 0.2 index, whole
        with pytest.raises(IndexOutdated):
            IndexStore.open(index_dir)
        assert migrate(index_dir).migrated
    else:  # after it: a migrated index, whose leftovers the next writer removes
        with IndexStore.open(index_dir, mode="r+").writing():
            pass
        assert not (index_dir / "tokens").exists()
    again = IndexStore.open(index_dir)
    assert again.verify() == []
    np.testing.assert_array_equal(again.tokens.get(np.arange(12)), old_tokens)


def test_verify_reads_the_stored_scales_not_those_a_process_cached(tmp_path):
    """int8 scales are cached whole; verify in a process that read them still finds their damage."""
    store, by_row = build_random_index(tmp_path / "i", "int8")
    reader = IndexStore.open(tmp_path / "i")
    reader.tokens.get([r for r in sorted(by_row) if 192 <= r < 238])  # shard 3's scales now cached
    _truncate(shard_file(tmp_path / "i", 192, SHARD, "token_scales"))
    assert any("token_scales segment" in p and "rows 128-237" in p for p in reader.verify())

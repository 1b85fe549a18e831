"""The vector segments and the token store on object storage: a real S3-protocol server (moto in server
mode) on 127.0.0.1, started and stopped here; the index passes the same build, query, verify
and repair checks as one on local disk."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from edje_search import Engine
from edje_search.storage.index_store import IndexStore
from edje_search.models.registry import load_model

pytest.importorskip("s3fs", reason="object storage needs the [s3] extra (s3fs)")
pytest.importorskip("moto", reason="the S3 test server needs moto[server]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    import fsspec

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    saved = dict(fsspec.config.conf)
    fsspec.config.conf["s3"] = {"endpoint_url": url, "key": "testing", "secret": "testing"}
    # the token shards go through tensorstore, which takes S3 credentials from the AWS environment
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("edje-test")
    yield url
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)
    for k, v in saved_env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(10)


def test_index_on_s3_answers_like_a_local_one(s3_endpoint, tmp_path, tiny_model_dir, shapes_dir):
    import fsspec

    model = load_model(tiny_model_dir)
    local = Engine.create(tmp_path / "local", model)
    local.sync(shapes_dir / "test", num_workers=0, progress=False, batch_size=16)
    remote = Engine.create(tmp_path / "remote", load_model(tiny_model_dir), store_url="s3://edje-test/idx")
    report = remote.sync(shapes_dir / "test", num_workers=0, progress=False, batch_size=16, commit_every=16)
    assert report.added == 40
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert len(fs.find("edje-test/idx/tokens.zarr/tokens/c")) == 3  # one shard per commit, on the server
    assert not any((tmp_path / "remote").rglob("*.npy")) and not (tmp_path / "remote" / "tokens.zarr").exists()

    reopened = Engine.from_pretrained(tmp_path / "remote")
    assert reopened.verify() == []
    for q in ("a red circle", "two blue squares"):
        want = [(h.path, round(h.score, 5)) for h in local.search(q, k=5, rerank_k=10)]
        assert [(h.path, round(h.score, 5)) for h in reopened.search(q, k=5, rerank_k=10)] == want
    local_rows = {e.path: e.row for e in local.store.entries}
    pairs = [(e.row, local_rows[e.path]) for e in reopened.store.entries][::-1]
    np.testing.assert_array_equal(reopened.store.tokens.get([r for r, _ in pairs]),
                                  local.store.tokens.get([r for _, r in pairs]))
    import zarr  # a plain Zarr reader on the bucket reads the same tokens

    group = zarr.open_group("s3://edje-test/idx/tokens.zarr", mode="r", storage_options=fsspec.config.conf["s3"])
    some = np.array(sorted(r for r, _ in pairs)[:20])
    np.testing.assert_array_equal(group["tokens"].oindex[some], reopened.store.tokens.get(some))

    gone = sorted(e.path for e in reopened.store.entries)[:3]
    writer = Engine.from_pretrained(tmp_path / "remote", writable=True)
    assert writer.remove(gone) == 3 and writer.verify() == []

    fs.rm("edje-test/idx/tokens.zarr/tokens/c/1/0/0")  # a lost object is an error, never zeros
    problems = Engine.from_pretrained(tmp_path / "remote").verify()
    assert any("missing" in p for p in problems)
    repaired = writer.repair()
    assert len(repaired.dropped) == 16 - len([p for p in gone if int(p[-10:-4]) in range(16, 32)])
    assert writer.verify() == []
    writer.sync(shapes_dir / "test", num_workers=0, progress=False, batch_size=16)  # re-embeds what was dropped
    assert len(writer.store) == 40 and writer.verify() == []
    stray = "edje-test/idx/tokens.zarr/tokens/c/99/0/0"
    fs.pipe(stray, b"a shard a crashed commit left")
    with writer.store.writing():  # the next writer removes what no generation owns
        pass
    assert not fs.exists(stray) and writer.verify() == []


@pytest.mark.parametrize("token_dtype", ["float16", "int8"])
def test_plain_zarr_readers_on_the_bucket_get_the_tokens_the_engine_gathers(s3_endpoint, tmp_path, token_dtype):
    import fsspec

    from tests.integration.test_token_store import build_random_index, tensorstore_tokens, zarr_tokens

    url = f"s3://edje-test/random-{token_dtype}"
    store, by_row = build_random_index(tmp_path / "i", token_dtype, store_url=url)
    rows = np.random.default_rng(2).choice(sorted(by_row), 100, replace=False)
    engine_view = IndexStore.open(tmp_path / "i").tokens.get(rows)
    np.testing.assert_array_equal(zarr_tokens(f"{url}/tokens.zarr", rows, fsspec.config.conf["s3"]), engine_view)
    kv = {"driver": "s3", "bucket": "edje-test", "path": f"random-{token_dtype}/tokens.zarr/",
          "endpoint": s3_endpoint, "aws_region": "us-east-1"}
    np.testing.assert_array_equal(tensorstore_tokens(kv, rows), engine_view)


def test_a_reader_holding_shard_indexes_reads_a_shard_replaced_on_the_bucket(s3_endpoint, tmp_path):
    """A shard's rows are read on condition that the object is still the one whose index was
    cached (its ETag): the same rows in another layout are read right, not through the old index."""
    import fsspec

    from tests.damage import shifted_shard
    from tests.integration.test_token_store import SHARD, build_random_index

    url = "s3://edje-test/replaced"
    store, by_row = build_random_index(tmp_path / "i", "float16", store_url=url)
    reader = IndexStore.open(tmp_path / "i")
    rows = [r for r in sorted(by_row) if 192 <= r < 238]  # shard 3
    np.testing.assert_array_equal(reader.tokens.get(rows), np.stack([by_row[r] for r in rows]))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    key = f"{url}/tokens.zarr/tokens/c/{192 // SHARD}/0/0"
    fs.pipe(key, shifted_shard(fs.cat(key), SHARD))
    np.testing.assert_array_equal(reader.tokens.get(rows), np.stack([by_row[r] for r in rows]))

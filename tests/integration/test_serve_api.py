"""`edje-search serve`: every endpoint of the JSON API through the real ASGI app, bad input
included, micro-batching and overload, the token, and an index updated while serving."""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'edje-search[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from edje_search import Engine  # noqa: E402
from edje_search.serve import (  # noqa: E402
    BatchSettings, MicroBatcher, Overloaded, ServeLimits, create_app, schemas)
from edje_search.serve.files import FileRefused, read_indexed_file  # noqa: E402

QUERY = "a small red circle left of a large blue square"
LIMITS = ServeLimits(max_upload_bytes=256 * 1024, max_json_bytes=16 * 1024)


@pytest.fixture(scope="module")
def index_dir(_built_index, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "idx"
    shutil.copytree(_built_index, d)
    return d


@pytest.fixture(scope="module")
def engine(index_dir):
    return Engine.from_pretrained(index_dir)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, limits=LIMITS, batching=BatchSettings(max_wait_ms=20))) as c:
        yield c


def assert_json_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and body["error"]
    assert "Traceback" not in response.text
    for w in words:
        assert w in body["error"], body["error"]


def png_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes that say 'PNG of width x height': a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# ------------------------------------------------------------------------------------ search
def test_get_search_matches_the_engine_and_shows_both_orders(client, engine):
    r = client.get("/search", params={"q": QUERY, "k": 5, "rerank_k": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    schemas.SearchResponse.model_validate(body)
    expected = engine.search(QUERY, k=5, rerank_k=12)
    assert [h["row"] for h in body["hits"]] == [h.row for h in expected]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    for h, e in zip(body["hits"], expected):
        assert h["path"] == e.path and h["rerank_score"] == pytest.approx(e.rerank_score, abs=1e-5)
        assert h["first_stage_score"] == pytest.approx(e.first_stage_score, abs=1e-6)
        assert h["image_url"] == f"/images/{h['row']}" and h["thumbnail_url"] == f"/thumbnails/{h['row']}"
    # the first-stage order is the engine's order without reranking
    plain = engine.search(QUERY, k=5, rerank_k=0)
    assert [h["row"] for h in body["first_stage"]] == [h.row for h in plain]
    assert [h["first_stage_rank"] for h in body["first_stage"]] == [1, 2, 3, 4, 5]
    # a hit's two ranks agree between the lists; reranking moved at least one of them
    pool = {h["row"]: (h["rank"], h["first_stage_rank"]) for h in body["hits"] + body["first_stage"]}
    assert all(1 <= fr <= 12 and 1 <= rr <= 12 for rr, fr in pool.values())
    assert any(h["rank"] != h["first_stage_rank"] for h in body["hits"])
    t = body["timings"]
    assert {"text_embed", "faiss", "gather", "rerank", "total"} <= set(t["stages_ms"])
    assert t["batch_queries"] >= 1 and t["queue_ms"] >= 0
    assert body["generation"] == engine.generation


def test_post_search_batch_equals_single_queries(client):
    queries = [QUERY, "two green triangles", "a blue square"]
    r = client.post("/search", json={"queries": queries, "k": 4, "rerank_k": 8})
    assert r.status_code == 200, r.text
    schemas.BatchResponse.model_validate(r.json())
    results = r.json()["results"]
    assert [x["query"] for x in results] == queries
    for q, res in zip(queries, results):
        single = client.get("/search", params={"q": q, "k": 4, "rerank_k": 8}).json()
        assert [h["row"] for h in res["hits"]] == [h["row"] for h in single["hits"]]
        assert [h["row"] for h in res["first_stage"]] == [h["row"] for h in single["first_stage"]]
    assert r.json()["timings"]["batch_queries"] >= 3


@pytest.mark.parametrize("params,status,words", [
    ({"q": ""}, 400, ["empty"]),
    ({"q": "   "}, 400, ["empty"]),
    ({"q": "x" * 10_000}, 400, ["too long", "10000"]),
    ({"q": QUERY, "k": 0}, 400, ["k must be"]),
    ({"q": QUERY, "k": 101}, 400, ["k must be"]),
    ({"q": QUERY, "k": -3}, 400, ["k must be"]),
    ({"q": QUERY, "rerank_k": -1}, 400, ["rerank_k"]),
    ({"q": QUERY, "rerank_k": 10_000}, 400, ["rerank_k"]),
    ({"q": QUERY, "k": "ten"}, 422, ["k"]),
    ({}, 422, ["q"]),
])
def test_get_search_rejects_bad_input(client, params, status, words):
    assert_json_error(client.get("/search", params=params), status, *words)


def test_post_search_rejects_bad_batches(client):
    assert_json_error(client.post("/search", json={"queries": []}), 400, "no queries")
    assert_json_error(client.post("/search", json={"queries": ["a"] * 33}), 400, "too many")
    assert_json_error(client.post("/search", json={"queries": ["ok", ""]}), 400, "empty")
    assert_json_error(client.post("/search", json={"queries": "not a list"}), 422)
    assert_json_error(client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 422)
    big = {"queries": ["x" * 400] * 50}  # 20 kB: over the 16 KiB body limit, refused before parsing
    assert_json_error(client.post("/search", json=big), 413, "too large")


# ------------------------------------------------------------------------------ image search
def indexed(client) -> dict[int, str]:
    """row -> path of every indexed image, through the API (first-stage order of any query)."""
    n = client.get("/health").json()["images"]
    hits = client.get("/search", params={"q": "anything", "k": n, "rerank_k": 0}).json()["hits"]
    assert len(hits) == n
    return {h["row"]: h["path"] for h in hits}


def test_image_search_by_upload_and_by_row(client, engine):
    paths = indexed(client)
    rows = sorted(paths)
    row = rows[3]
    path = paths[row]
    with open(path, "rb") as f:
        data = f.read()
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and hits[0]["row"] == row and hits[0]["first_stage_score"] == pytest.approx(1.0, abs=1e-3)
    # by row: brute-force cosine over the stored first-stage vectors, the row itself left out
    r = client.post("/search/image", data={"row": row, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    schemas.ImageSearchResponse.model_validate(body)
    vectors = np.asarray(engine.store.vectors(rows), dtype=np.float32)
    sims = vectors @ vectors[rows.index(row)]
    expected = [rows[i] for i in np.argsort(-sims, kind="stable") if rows[i] != row][:4]
    assert body["query_row"] == row and [h["row"] for h in body["hits"]] == expected
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4]
    assert "image_embed" in body["timings"]["stages_ms"]


def test_image_search_rejects_bad_uploads(client):
    def post(data: bytes, **form):
        return client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data=form)

    assert_json_error(post(b"this is not an image"), 400, "not a usable image")
    assert_json_error(post(b""), 400)
    assert_json_error(post(png_header_claiming(20_000, 20_000)), 400, "not a usable image")  # 400 megapixels
    assert_json_error(post(png_bytes()[:60]), 400, "not a usable image")  # truncated
    assert_json_error(post(os.urandom(300 * 1024)), 413, "too large")  # over the 256 KiB upload limit
    assert_json_error(post(png_bytes(), k="0"), 400, "k must be")
    assert_json_error(client.post("/search/image", data={"k": 3}), 400, "exactly one")
    assert_json_error(client.post("/search/image", files={"file": ("q.png", png_bytes(), "image/png")},
                                  data={"row": 1}), 400, "exactly one")
    assert_json_error(client.post("/search/image", data={"row": 10**6}), 404, "not in the index")


# ----------------------------------------------------------------------------- files
def test_images_and_thumbnails(client):
    row, path = sorted(indexed(client).items())[0]
    with open(path, "rb") as f:
        original = f.read()
    r = client.get(f"/images/{row}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == original
    r = client.get(f"/thumbnails/{row}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    before = client.get("/info").json()["served"]["thumbnail_cache_hits"]
    again = client.get(f"/thumbnails/{row}", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/info").json()["served"]["thumbnail_cache_hits"] == before + 1


@pytest.mark.parametrize("url", [
    "/images/../../etc/passwd", "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/images/..%252F..%252Fetc%252Fpasswd", "/images/-1", "/images/999999", "/images/1e3", "/images/%00",
    "/thumbnails/..%2F..%2Fetc%2Fpasswd", "/thumbnails/999999", "/etc/passwd",
])
def test_only_indexed_files_are_served(client, url):
    r = client.get(url)
    assert_json_error(r, 404)
    assert "root:" not in r.text


def test_symlink_escape_and_non_images_are_refused(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    (elsewhere / "private.png").write_bytes(png_bytes())
    (photos / "ok.png").write_bytes(png_bytes())
    os.symlink(photos / "ok.png", photos / "alias.png")  # inside the folder: fine
    os.symlink("/etc/passwd", photos / "passwd.png")
    os.symlink(elsewhere / "private.png", photos / "escape.png")
    (photos / "notes.png").write_text("not an image")
    assert read_indexed_file(str(photos / "ok.png"))[1] == "image/png"
    assert read_indexed_file(str(photos / "alias.png"))[1] == "image/png"
    for name, status in [("passwd.png", 403), ("escape.png", 403), ("notes.png", 403), ("gone.png", 404)]:
        with pytest.raises(FileRefused) as err:
            read_indexed_file(str(photos / name))
        assert err.value.status == status, name


# ---------------------------------------------------------------------------- status, docs, pages
def test_info_health_docs_and_gallery(client, engine):
    info = client.get("/info").json()
    assert info["images"] == len(engine) and info["limits"]["max_k"] == 100
    assert info["batching"]["max_batch"] == 32
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["images"] == len(engine)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/image", "/images/{row}", "/thumbnails/{row}", "/info", "/health"} <= set(paths)
    assert {"get", "post"} <= set(paths["/search"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    page = client.get("/")
    assert page.status_code == 200 and 'id="grid"' in page.text
    # everything the pages load comes from this server: no CDN, no external font
    assets = [docs.text, page.text, client.get("/static/gallery.js").text, client.get("/static/gallery.css").text]
    for src in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        if src in docs.text:
            assert client.get(src).status_code == 200
    for text in assets:
        assert "http://" not in text and "https://" not in text.replace("https://github.com", "")
    assert_json_error(client.get("/no/such/page"), 404)


def test_token_required_on_every_endpoint(engine):
    app = create_app(engine, token="s3cret-token")
    good = {"Authorization": "Bearer s3cret-token"}
    urls = ["/", "/health", "/info", f"/search?q={QUERY}", "/docs", "/openapi.json", "/static/gallery.js",
            "/thumbnails/0", "/images/0"]
    with TestClient(app) as c:
        for url in urls:
            assert_json_error(c.get(url), 401, "token")
            assert_json_error(c.get(url, headers={"Authorization": "Bearer wrong"}), 401)
            assert c.get(url, headers=good).status_code in (200, 404), url
        assert_json_error(c.post("/search", json={"queries": [QUERY]}), 401)
        assert c.post("/search", json={"queries": [QUERY]}, headers=good).status_code == 200
        assert_json_error(c.post("/search/image", data={"row": 0}), 401)
        assert c.get("/", headers={"WWW-Authenticate": "x"}).status_code == 401
        # a browser: sent to the login form, whose POST sets the session cookie; <img> requests carry it
        assert c.get("/", headers={"Accept": "text/html"}, follow_redirects=False).headers["location"] == "/login"
        assert 'name="token"' in c.get("/login").text
        assert c.post("/login", data={"token": "wrong"}, follow_redirects=False).status_code == 401
        assert_json_error(c.get("/?token=s3cret-token", follow_redirects=False), 401)  # URLs carry no login
        r = c.post("/login", data={"token": "s3cret-token"}, follow_redirects=False)
        cookie = r.headers["set-cookie"]
        assert r.status_code == 303 and "HttpOnly" in cookie and "s3cret" not in cookie
        assert c.get("/thumbnails/0").status_code == 200
        assert c.get(f"/search?q={QUERY}").status_code == 200
        c.cookies.clear()
        assert c.get("/thumbnails/0").status_code == 401


def test_unexpected_errors_are_json_without_traceback(engine):
    app = create_app(engine)

    def broken(key, jobs):
        raise RuntimeError("secret internal detail")
    app.state.batcher._run = broken
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/search", params={"q": QUERY})
    assert_json_error(r, 500, "internal error")
    assert "secret internal detail" not in r.text


# ------------------------------------------------------------------------ batching and load
def test_concurrent_requests_share_engine_calls(engine):
    app = create_app(engine, batching=BatchSettings(max_batch=16, max_wait_ms=100))
    queries = [f"{c} circle number {i}" for i, c in enumerate(["red", "blue", "green", "gray"] * 3)]
    with TestClient(app) as c:
        with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
            responses = list(pool.map(lambda q: c.get("/search", params={"q": q, "k": 3, "rerank_k": 6}), queries))
        batches = app.state.batcher.batches
        alone = [c.get("/search", params={"q": q, "k": 3, "rerank_k": 6}).json() for q in queries]
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["timings"]["batch_queries"] for r in responses) > 1
    assert batches < len(queries)
    for r, a in zip(responses, alone):  # batching does not change what anyone gets
        assert [h["row"] for h in r.json()["hits"]] == [h["row"] for h in a["hits"]]


@pytest.mark.parametrize("max_in_flight,refusal", [(10, "queued"), (1, "requests in progress")])
def test_full_queue_answers_503_with_retry_after(engine, max_in_flight, refusal):
    """Refused by the engine's queue (1 query) or, before that, by the cap on requests in progress."""
    app = create_app(engine, batching=BatchSettings(max_batch=1, max_wait_ms=0, max_queue=1),
                     max_in_flight=max_in_flight)
    release = threading.Event()
    with TestClient(app) as c:
        batcher = app.state.batcher
        c.portal.start_task_soon(batcher.call, lambda: release.wait(30))  # the engine thread is busy
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                # one request waits for the engine thread, the next fills the queue of 1
                waiting = []
                conditions = [lambda: batcher.running == 1, lambda: batcher.queued == 1][:max_in_flight]
                for condition in conditions:
                    waiting.append(pool.submit(c.get, "/search", params={"q": QUERY}))
                    deadline = time.monotonic() + 10
                    while not condition() and time.monotonic() < deadline:
                        time.sleep(0.01)
                refused = c.get("/search", params={"q": QUERY})
                health = c.get("/health")  # still answers while the queue is full
                release.set()
                assert [w.result(timeout=30).status_code for w in waiting] == [200] * len(conditions)
        finally:
            release.set()
    assert_json_error(refused, 503, "busy", refusal)
    assert int(refused.headers["retry-after"]) >= 1
    assert health.status_code == 200 and health.json()["queued"] == len(conditions) - 1


def test_micro_batcher_groups_by_key_and_bounds_its_queue():
    calls = []
    gate = threading.Event()

    def run(key, payloads):
        gate.wait(10)
        calls.append((key, list(payloads)))
        return [p * 10 for p in payloads]

    async def scenario():
        b = MicroBatcher(run, BatchSettings(max_batch=3, max_wait_ms=0, max_queue=6))
        await b.start()
        try:
            jobs = [asyncio.ensure_future(b.submit("b", 0))]
            while b.running != 1:  # job 0 is in the engine thread, blocked on the gate
                await asyncio.sleep(0.005)
            jobs += [asyncio.ensure_future(b.submit("a" if i % 3 else "b", i)) for i in range(1, 7)]
            await asyncio.sleep(0.02)
            assert b.queued == 6
            with pytest.raises(Overloaded):
                await b.submit("a", 99)
            gate.set()
            return await asyncio.gather(*jobs)
        finally:
            gate.set()
            await b.stop()

    results = asyncio.run(scenario())
    assert [r for r, _ in results] == [i * 10 for i in range(7)]
    # the oldest job's key goes first, with every queued job of that key up to max_batch
    assert calls == [("b", [0]), ("a", [1, 2, 4]), ("b", [3, 6]), ("a", [5])]
    assert [info.queries for _, info in results] == [1, 3, 3, 2, 3, 1, 2]


def test_serve_command_fails_in_one_line_on_a_missing_index(tmp_path):
    from click.testing import CliRunner

    from edje_search_cli.main import cli, register_commands

    register_commands()
    result = CliRunner().invoke(cli, ["serve", "--index", str(tmp_path / "nothing"), "--port", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "--token" in CliRunner().invoke(cli, ["serve", "--help"]).output


# ------------------------------------------------------------------------ updates while serving
def test_add_while_serving_makes_a_new_image_searchable(built_index, tmp_path):
    from click.testing import CliRunner

    from edje_search_cli.main import cli, register_commands

    register_commands()
    new = tmp_path / "new" / "fresh.png"
    new.parent.mkdir()
    gradient = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)
    Image.fromarray(gradient).save(new)
    app = create_app(Engine.from_pretrained(built_index), refresh_interval_s=0)
    with TestClient(app) as c:
        n = c.get("/health").json()["images"]
        before = c.get("/search", params={"q": QUERY, "k": n, "rerank_k": 0}).json()
        assert str(new) not in [h["path"] for h in before["hits"]]
        added = CliRunner().invoke(cli, ["add", str(new), "--index", str(built_index), "--workers", "0"])
        assert added.exit_code == 0, added.output
        # no restart: the next request sees the new generation
        after = c.get("/search", params={"q": QUERY, "k": n + 1, "rerank_k": 5}).json()
        assert after["generation"] > before["generation"]
        assert str(new) in [h["path"] for h in after["hits"]]
        assert c.get("/info").json()["images"] == n + 1
        with open(new, "rb") as f:
            found = c.post("/search/image", files={"file": ("q.png", f.read(), "image/png")}, data={"k": 1}).json()
        row = found["hits"][0]["row"]
        assert found["hits"][0]["path"] == str(new)
        assert c.get(f"/images/{row}").status_code == 200
        # the file is swapped for a symlink to a secret: the row no longer serves anything
        new.unlink()
        os.symlink("/etc/passwd", new)
        refused = c.get(f"/images/{row}")
        assert_json_error(refused, 403)
        assert "root:" not in refused.text


def test_micro_batcher_waits_for_company_only_when_some_is_coming():
    async def one_job(coming: int) -> float:
        b = MicroBatcher(lambda key, payloads: payloads, BatchSettings(max_wait_ms=300), coming=lambda: coming)
        await b.start()
        try:
            t = time.perf_counter()
            await b.submit("a", 1)
            return time.perf_counter() - t
        finally:
            await b.stop()

    assert asyncio.run(one_job(0)) < 0.15  # nobody else in the server: the idle engine starts at once
    assert asyncio.run(one_job(1)) >= 0.25  # another request is on its way: wait (up to 300 ms) for it


def test_serve_names_its_indexes_from_the_command_line():
    from edje_search_cli.serve_commands import _named_indexes

    assert _named_indexes(("indexes/my photos.v2",)) == {"my-photos-v2": "indexes/my photos.v2"}
    assert _named_indexes(("a=x", "b=y")) == {"a": "x", "b": "y"}
    assert _named_indexes(()) == {"default": "indexes/default"}

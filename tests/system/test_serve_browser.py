"""The gallery in a real browser: Debian's chromium (driven by Playwright, headless) against
`edje-search serve` under uvicorn on 127.0.0.1, with a token, as a user would use it.

The page's Content-Security-Policy forbids eval, so every wait below is a JS function."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [dev] extra)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TOKEN = "browser-test-token"
QUERY = "a small red circle left of a large blue square"
K = 8


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (`make install` as root installs it)")
    return CHROMIUM


@contextlib.contextmanager
def serving(index):
    """`edje-search serve --index INDEX` in its own process (the real command line and uvicorn)."""
    server_module = pytest.importorskip("edje_search.serve.server", reason="the [serve] extra is not installed")
    port = server_module.free_port()
    env = {**os.environ, "EDJE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edje_search_cli", "serve", "--index", str(index),
                             "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"edje-search serve exited: {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("edje-search serve did not answer /health within 90 s")
            time.sleep(0.2)
        yield url, headers
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(chromium, _built_index, tmp_path_factory):
    index = tmp_path_factory.mktemp("browser") / "idx"
    shutil.copytree(_built_index, index)
    with serving(index) as running:
        yield running


@pytest.fixture(scope="module")
def page(chromium, server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.problems = []
            page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


def grid_rows(page) -> list[int]:
    return [int(r) for r in page.eval_on_selector_all("#grid .card", "cards => cards.map(c => c.dataset.row)")]


def wait_for_thumbnails(page, n: int) -> None:
    """n cards whose thumbnails were fetched and decoded by the browser."""
    page.wait_for_function(
        """n => { const imgs = [...document.querySelectorAll('#grid .card img')];
                  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""", arg=n)


def test_gallery_search_switch_viewer_and_image_search(server, page, _built_index):
    url, headers = server
    # without the token the page is refused; a browser is sent to the login form, whose POST sets
    # the session cookie and redirects to /
    assert httpx.get(f"{url}/").status_code == 401
    page.goto(f"{url}/")
    assert page.url == f"{url}/login"
    page.fill("#token", TOKEN)
    page.click("#login-button")
    page.wait_for_url(f"{url}/")
    page.wait_for_function("() => document.querySelector('#index-info').textContent.includes('40 images')")

    page.fill("#query", QUERY)
    page.fill("#k", str(K))
    page.fill("#rerank-k", "20")
    page.click("#search-button")
    wait_for_thumbnails(page, K)

    api = httpx.get(f"{url}/search", params={"q": QUERY, "k": K, "rerank_k": 20}, headers=headers).json()
    reranked = [h["row"] for h in api["hits"]]
    first_stage = [h["row"] for h in api["first_stage"]]
    assert reranked != first_stage  # the random tiny reranker reorders this query's candidates
    assert grid_rows(page) == reranked
    assert page.locator("#grid .move.up, #grid .move.down").count() >= 1  # moves are shown
    stages = page.inner_text("#timings")
    assert "rerank" in stages and "faiss" in stages and "ms" in stages

    page.click("#order-first")
    wait_for_thumbnails(page, K)
    assert grid_rows(page) == first_stage
    page.click("#order-reranked")
    assert grid_rows(page) == reranked

    # click a thumbnail: the full image and its scores
    page.click("#grid .card >> nth=0")
    page.wait_for_function("""() => { const i = document.querySelector('#viewer-image');
        return document.querySelector('#viewer').open && i.complete && i.naturalWidth > 0; }""")
    scores = page.inner_text("#viewer-scores")
    assert "rerank score" in scores and "first-stage rank" in scores
    assert page.inner_text("#viewer-path") == api["hits"][0]["path"]

    # "find similar": first-stage image neighbours of that row, itself left out
    page.click("#viewer-similar")
    page.wait_for_function("row => document.querySelector('#status').textContent.includes(`row ${row}`)",
                           arg=reranked[0])
    wait_for_thumbnails(page, K)
    similar = httpx.post(f"{url}/search/image", data={"row": reranked[0], "k": K}, headers=headers).json()
    assert grid_rows(page) == [h["row"] for h in similar["hits"]]

    # upload one of the indexed files: it comes back first
    page.set_input_files("#upload", api["hits"][2]["path"])
    page.wait_for_function("row => document.querySelector('#grid .card')?.dataset.row === String(row)",
                           arg=reranked[2])
    wait_for_thumbnails(page, K)

    assert page.problems == []


def test_gallery_filters_show_the_active_filter_and_the_empty_state(server, page, _built_index):
    url, headers = server
    page.goto(f"{url}/?token={TOKEN}")
    folder = os.path.basename(os.path.dirname(httpx.get(f"{url}/search", params={"q": QUERY, "k": 1},
                                                          headers=headers).json()["hits"][0]["path"]))
    page.fill("#query", QUERY)
    page.fill("#k", str(K))
    page.fill("#f-folder", folder)  # every indexed image lies in that folder: k hits, all from it
    page.click("#search-button")
    wait_for_thumbnails(page, K)
    where = f'folder glob "*{folder}*"'
    assert page.inner_text("#active-filter") == f"filter: {where}"
    api = httpx.get(f"{url}/search", params={"q": QUERY, "k": K, "rerank_k": page.input_value("#rerank-k"),
                                             "where": where}, headers=headers).json()
    assert grid_rows(page) == [h["row"] for h in api["hits"]] and len(api["hits"]) == K

    # a date range: the generated PNGs carry no EXIF date, so no image passes
    page.fill("#f-from", "2020-01-01")
    page.fill("#f-to", "2020-12-31")
    page.click("#search-button")
    page.wait_for_function("() => document.querySelector('#status').textContent === 'no image passes the filter'")
    assert grid_rows(page) == []
    assert 'taken >= "2020-01-01" and taken <= "2020-12-31"' in page.inner_text("#active-filter")

    # a filter that does not parse: the server's one-line error, shown as it is
    page.fill("#f-from", "")
    page.fill("#f-to", "")
    page.fill("#f-where", "width >")
    page.click("#search-button")
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "position" in page.inner_text("#status") and "fields:" in page.inner_text("#status")
    assert all("400" in p for p in page.problems)  # the browser logs the 400 itself; nothing else went wrong
    page.problems.clear()


def test_gallery_opens_a_duplicate_group(server, page):
    url, headers = server
    found = httpx.get(f"{url}/duplicates", params={"threshold": 0.999}, headers=headers)
    assert found.status_code == 200
    groups = found.json()["exact"] + found.json()["near"]
    assert groups, "the tiny random model puts near-identical generated scenes above 0.999"
    page.goto(f"{url}/?token={TOKEN}")
    page.click("#duplicates-button")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('groups of exact copies')")
    default = httpx.get(f"{url}/duplicates", headers=headers).json()  # what the page asked for
    shown = default["exact"] + default["near"]
    assert page.locator("#grid .card.group").count() == len(shown) > 0
    page.click("#grid .card.group >> nth=0")
    wait_for_thumbnails(page, len(shown[0]["images"]))
    assert grid_rows(page) == [img["row"] for img in shown[0]["images"]]
    assert page.problems == []


@pytest.fixture(scope="module")
def photo_server(chromium, tiny_model_dir, tmp_path_factory):
    """A second server, over photos that carry EXIF dates: 8 in folder `trips` (taken 2019 to
    2022), 4 undated in `misc` plus an exact and a resized copy of one of them."""
    import numpy as np
    from PIL import Image

    from edje_search import Engine, load_model

    root = tmp_path_factory.mktemp("dated")
    rng = np.random.default_rng(3)
    for i in range(12):
        folder = root / ("trips" if i < 8 else "misc")
        folder.mkdir(exist_ok=True)
        px = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
        px[:, :24] = rng.integers(0, 255, 3)
        ex = Image.Exif()
        if i < 8:
            ex.get_ifd(0x8769)[0x9003] = f"{2019 + i % 4}:0{1 + i % 9}:1{i % 9} 10:00:00"
        Image.fromarray(px).save(folder / f"p{i:02d}.jpg", "JPEG", quality=92, exif=ex)
    shutil.copy(root / "misc" / "p08.jpg", root / "misc" / "p08_copy.jpg")
    Image.open(root / "misc" / "p09.jpg").resize((36, 36)).save(root / "misc" / "p09_small.jpg", quality=80)
    index = root / "idx"
    Engine.create(index, load_model(tiny_model_dir), factory="Flat").sync(root, num_workers=0, progress=False)
    with serving(index) as running:
        yield running


def test_gallery_filters_probability_slider_no_match_and_duplicates(photo_server, page):
    url, headers = photo_server
    page.goto(f"{url}/?token={TOKEN}")
    page.wait_for_function("() => document.querySelector('#index-info').textContent.includes('14 images')")
    page.fill("#query", QUERY)
    page.fill("#k", "10")
    page.fill("#f-folder", "trips")
    page.fill("#f-from", "2020-01-01")
    page.fill("#f-to", "2021-12-31")
    page.click("#search-button")
    where = 'folder glob "*trips*" and taken >= "2020-01-01" and taken <= "2021-12-31"'
    api = httpx.get(f"{url}/search", params={"q": QUERY, "k": 10, "rerank_k": page.input_value("#rerank-k"),
                                             "where": where}, headers=headers).json()
    assert len(api["hits"]) == 4  # p01, p02, p05, p06: taken in 2020 or 2021
    wait_for_thumbnails(page, 4)
    assert page.inner_text("#active-filter") == f"filter: {where}"
    assert grid_rows(page) == [h["row"] for h in api["hits"]]
    assert "prob" in page.inner_text("#grid .card >> nth=0")

    # a low cutoff keeps every reranked hit; the slider's far end (1.00) keeps none
    probs = [h["prob"] for h in api["hits"]]
    page.focus("#min-prob")
    with page.expect_response(lambda r: "min_prob=0.01" in r.url):
        page.keyboard.press("ArrowRight")  # one step: 0.01, and the search runs again
    wait_for_thumbnails(page, 4)
    assert page.inner_text("#min-prob-value") == "0.01" and min(probs) >= 0.01
    with page.expect_response(lambda r: "min_prob=1" in r.url):
        page.keyboard.press("End")
    page.wait_for_function("() => document.querySelector('#status').textContent === 'no image matches'")
    assert page.inner_text("#min-prob-value") == "1.00"
    assert grid_rows(page) == []
    cut = httpx.get(f"{url}/search", params={"q": QUERY, "k": 10, "where": where, "min_prob": 1}, headers=headers)
    assert cut.json()["hits"] == []

    # duplicates: the exact copy is a group of its own; opening it shows both files
    page.click("#duplicates-button")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('groups of exact copies')")
    found = httpx.get(f"{url}/duplicates", headers=headers).json()
    exact = found["exact"][0]
    assert sorted(os.path.basename(i["path"]) for i in exact["images"]) == ["p08.jpg", "p08_copy.jpg"]
    page.click("#grid .card.group >> nth=0")
    wait_for_thumbnails(page, 2)
    assert grid_rows(page) == [img["row"] for img in exact["images"]]
    assert page.problems == []

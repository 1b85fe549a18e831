"""clip-retrieval users switch without changing code: its own `ClipClient` (loaded from the
installed clip-retrieval package, unchanged) and its built clip-front against `edje-search
serve`'s /knn-service, /metadata and /indices-list, on 127.0.0.1, two indexes at once."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from edje_search import Engine, load_model
from edje_search.images import DecodeLimits, decode_untrusted

serve_server = pytest.importorskip("edje_search.serve.server", reason="the [serve] extra is not installed")
from edje_search.serve import create_app  # noqa: E402

N = 6
QUERY = "a small red circle left of a large blue square"


def _clip_client_module():
    """clip_retrieval/clip_client.py as shipped: the package's __init__ imports its Flask back end
    (not installed: clip-retrieval goes in with --no-deps), so the client file is loaded by path."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (`make install` installs it with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client_under_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(tmp_path_factory, _built_index, tiny_model_dir, shapes_dir):
    """The 40-image test index as "shapes" and a second index ("dups": 8 validation scenes and an
    exact copy of one of them) from one server."""
    root = tmp_path_factory.mktemp("clip")
    shapes = root / "shapes"
    shutil.copytree(_built_index, shapes)
    folder = root / "dup-images"
    folder.mkdir()
    for p in sorted((shapes_dir / "val").glob("*.png"))[:8]:
        shutil.copy(p, folder / p.name)
    first = sorted(folder.glob("*.png"))[0]
    shutil.copy(first, folder / "copy-of-first.png")
    dups = Engine.create(root / "dups", load_model(tiny_model_dir))
    dups.sync(folder, num_workers=0, progress=False)
    engines = {"shapes": Engine.from_pretrained(shapes), "dups": Engine.from_pretrained(root / "dups")}
    app = create_app(engines["shapes"], index_name="shapes", more_indexes={"dups": engines["dups"]})
    with serve_server.BackgroundServer(app) as url:
        yield url, engines, first


def test_clip_client_text_query_returns_the_engines_reranked_order(served):
    url, engines, _ = served
    client = _clip_client_module().ClipClient(url=f"{url}/knn-service", indice_name="shapes", num_images=N,
                                              deduplicate=False)
    got = client.query(text=QUERY)
    expected = engines["shapes"].search(QUERY, k=N, rerank_k=N)
    assert [r["id"] for r in got] == [h.row for h in expected]
    assert [r["similarity"] for r in got] == pytest.approx([h.score for h in expected], abs=1e-4)
    assert all(r["image_path"] == h.path and r["url"].endswith(f"/images/{h.row}") for r, h in zip(got, expected))
    image = httpx.get(got[0]["url"])
    assert image.status_code == 200 and image.content == Path(expected[0].path).read_bytes()


def test_clip_client_image_query_returns_first_stage_neighbours(served):
    url, engines, _ = served
    engine = engines["shapes"]
    path = engine.search(QUERY, k=1, rerank_k=0)[0].path
    client = _clip_client_module().ClipClient(url=f"{url}/knn-service", indice_name="shapes", num_images=N,
                                              deduplicate=False)
    got = client.query(image=path)
    side, mode = engine.image_input
    pixels = engine.preprocess(decode_untrusted(Path(path).read_bytes(), DecodeLimits(), side, resize_mode=mode))
    expected = engine.search_by_image([pixels], k=N)[0]
    assert [r["id"] for r in got] == [h.row for h in expected]
    assert got[0]["image_path"] == path and got[0]["similarity"] == pytest.approx(1.0, abs=1e-3)


def test_deduplicate_drops_a_planted_copy_and_indexes_answer_by_name(served):
    url, engines, first = served
    module = _clip_client_module()
    assert httpx.get(f"{url}/indices-list").json() == ["shapes", "dups"]
    keep = module.ClipClient(url=f"{url}/knn-service", indice_name="dups", num_images=4, deduplicate=False)
    both = keep.query(image=str(first))
    paths = [r["image_path"] for r in both[:2]]
    assert sorted(os.path.basename(p) for p in paths) == sorted([first.name, "copy-of-first.png"])
    assert all(r["url"].startswith(f"{url}/indexes/dups/images/") for r in both)
    assert httpx.get(both[0]["url"]).status_code == 200
    dedupe = module.ClipClient(url=f"{url}/knn-service", indice_name="dups", num_images=4, deduplicate=True)
    once = dedupe.query(image=str(first))
    assert [r["id"] for r in once] == [r["id"] for i, r in enumerate(both) if i != 1][:len(once)]
    assert sum(os.path.basename(r["image_path"]) in (first.name, "copy-of-first.png") for r in once) == 1
    meta = httpx.post(f"{url}/metadata", json={"ids": [once[0]["id"], 10**30], "indice_name": "dups"}).json()
    assert [m["id"] for m in meta] == [once[0]["id"]]  # the id beyond any row is left out
    assert meta[0]["metadata"]["image_path"] == once[0]["image_path"] and meta[0]["metadata"]["url"] == once[0]["url"]
    assert meta[0]["metadata"]["name"] == os.path.basename(once[0]["image_path"])  # indexing metadata comes along


def test_knn_service_refuses_what_it_cannot_honour_with_json_errors(served):
    url, _, _ = served
    base = {"modality": "image", "num_images": 3, "indice_name": "shapes"}
    for body, status, words in [
        ({**base, "text": QUERY, "indice_name": "nope"}, 404, "no index named"),
        ({**base, "image_url": "http://example.com/cat.jpg"}, 400, "never fetches"),
        ({**base, "text": QUERY, "modality": "text"}, 400, "images only"),
        ({**base}, 400, "exactly one"),
        ({**base, "image": "%%% not base64"}, 400, "base64"),
        ({**base, "embedding_input": [0.0] * 4}, 400, "non-zero"),
        ({**base, "text": "\x00"}, 400, ""),
    ]:
        r = httpx.post(f"{url}/knn-service", content=json.dumps(body))  # no JSON content type, as clip-front
        assert r.status_code == status, (body, r.text)
        assert r.json()["status"] == status and words in r.json()["error"]
    assert httpx.post(f"{url}/knn-service", content=b"{not json").status_code == 400


def test_clip_front_served_by_edje_search_shows_results_from_this_server(served, tmp_path):
    url, engines, _ = served
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.skip(f"Debian's chromium is not installed at {chromium}")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if httpx.get(f"{url}/clip-front/").status_code != 200:
        pytest.skip("clip-front is not installed (clip-retrieval's wheel ships it)")
    config = httpx.get(f"{url}/clip-front/config.json").json()
    assert config == {"defaultBackend": url, "defaultIndex": "shapes", "urlColumn": "url"}
    hosts = set()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                     "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.on("request", lambda req: hosts.add(urlparse(req.url).hostname))
            page.set_default_timeout(30_000)
            page.goto(f"{url}/clip-front/")
            page.wait_for_function(
                "() => document.querySelector('clip-front')?.shadowRoot?.getElementById('searchBar')")
            bar = page.locator("clip-front").locator("#searchBar")
            bar.fill(QUERY)
            bar.press("Enter")
            # what clip-front asks for by default (40 images of 3,000 ids, near-duplicates hidden:
            # the tiny random model embeds many scenes alike, so fewer than 40 remain)
            sent = {"text": QUERY, "modality": "image", "num_images": 40, "num_result_ids": 3000,
                    "indice_name": "shapes", "deduplicate": True}
            expected = len(httpx.post(f"{url}/knn-service", content=json.dumps(sent)).json())
            assert expected >= 1
            page.wait_for_function(
                """n => { const imgs = [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img')]
                            .filter(i => i.src.includes('/images/'));
                          return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
                arg=expected)
            # with near-duplicates shown, every one of the index's 40 images comes back and loads
            page.locator("clip-front").get_by_label("Hide (near) duplicate images").click()
            page.wait_for_function(
                """n => { const imgs = [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img')]
                            .filter(i => i.src.includes('/images/'));
                          return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
                arg=len(engines["shapes"]))
        finally:
            browser.close()
    assert hosts <= {"127.0.0.1"}, hosts

"""Screenshot of the gallery for the README: headless Debian chromium against `edje-search serve`.

    python scripts/gallery_screenshot.py                        # tiny-random model over generated scenes
    python scripts/gallery_screenshot.py --index indexes/demo   # any built index
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from edje_search import Engine, load_model
from edje_search.serve import BackgroundServer, create_app

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def tiny_index(root: Path, n_images: int) -> Path:
    from edje_search.data.synthetic import make_dataset
    from edje_search.models.registry import build_tiny_model

    build_tiny_model(seed=0).save_pretrained(root / "model")
    make_dataset(root / "data", n_train=0, n_val=0, n_test=n_images, image_size=128, seed=5, progress=False)
    engine = Engine.create(root / "idx", load_model(root / "model"))
    engine.sync(root / "data" / "test", num_workers=0, progress=False)
    return root / "idx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default=None, help="a built index (default: a tiny-random one made here)")
    ap.add_argument("--query", default="a small red circle left of a large blue square")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--out", default="docs/gallery.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edje-shot-"))
    try:
        index = Path(args.index) if args.index else tiny_index(tmp, 64)
        with BackgroundServer(create_app(Engine.from_pretrained(index))) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_function("() => document.querySelector('#index-info').textContent.includes('images')")
            page.fill("#query", args.query)
            page.fill("#k", str(args.k))
            page.click("#search-button")
            page.wait_for_function("""n => { const imgs = [...document.querySelectorAll('#grid .card img')];
                return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""", arg=args.k)
            page.screenshot(path=args.out, full_page=False)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

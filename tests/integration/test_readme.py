"""The Python examples of README.md and docs/library.md run as written, against tiny models built offline.

Each ```python block of those pages runs in a fresh namespace, in a folder holding ``./photos``,
with ``$EDJE_HOME`` holding a tiny ``edje-demo``. The names a block leaves to the reader
(``MODEL_DIR``, ``image_paths``, ``captions``) are given; what the block computes is checked.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from edje_search import EdjeModel
from edje_search.convert import convert_official

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "README.md", ROOT / "docs" / "library.md")


def python_blocks() -> list[str]:
    return [b for page in PAGES for b in re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.S | re.M)]


def block_with(text: str) -> str:
    found = [b for b in python_blocks() if text in b]
    assert len(found) == 1, f"expected one python block containing {text!r} in the pages, found {len(found)}"
    return found[0]


@pytest.fixture
def readme_home(docs_workspace) -> Path:
    """A working folder with ./photos (6 scenes) and $EDJE_HOME/models/edje-demo (the tiny random model)."""
    return docs_workspace(6)


def test_every_python_block_is_covered():
    blocks = python_blocks()
    assert len(blocks) == 3
    readme = PAGES[0].read_text()
    assert "Engine.create_or_open" in readme, "the README keeps the library example"
    covered = ("Engine.create_or_open", "except EdjeError", "Reranker.from_pretrained(MODEL_DIR)")
    assert all(any(c in b for c in covered) for b in blocks)


def test_library_example(readme_home, capsys):
    ns: dict = {}
    exec(block_with("Engine.create_or_open"), ns)  # noqa: S102 - the README's own code
    assert len(ns["many"]) == 2 and all(len(hits) == 5 for hits in ns["many"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 5 and all(line.startswith(str(i + 1)) for i, line in enumerate(printed))
    assert (readme_home / "indexes" / "photos").is_dir()
    # the output the README shows is this run's (benchmarks/readme_example.py sets it up the same way)
    shown = (ROOT / "benchmarks" / "results" / "readme_library_example.txt").read_text().splitlines()[1:]
    assert [line.replace(f"{readme_home}/", "") for line in printed] == shown
    assert all(f"    {line}" in PAGES[0].read_text() for line in shown)


def test_error_example(readme_home, capsys):
    exec(block_with("except EdjeError"), {})  # noqa: S102
    assert capsys.readouterr().out.startswith("ModelNotAvailable 'no-such-model'")


@pytest.fixture(params=["tiny-open-clip", "official-layout"])
def model_dir(request, tmp_path, tiny_model_dir) -> Path:
    if request.param == "tiny-open-clip":
        return tiny_model_dir
    # a converted checkpoint of the official EDJE code (SigLIP first stage), as in test_official_checkpoint
    from test_official_checkpoint import official_layout_dirs, official_state

    root, siglip, tok = official_layout_dirs(tmp_path / "hub")
    torch.save({"model": official_state(siglip, tok, "compressed")}, tmp_path / "ckpt.pt")
    convert_official(tmp_path / "ckpt.pt", root / "siglip", root / "bert", tmp_path / "official")
    return tmp_path / "official"


def test_scoring_example_on_a_model_directory(model_dir, shapes_dir, capsys):
    image_paths = sorted((shapes_dir / "test").glob("*.png"))[:3]
    captions = ["a small red circle left of a large blue square", "two green triangles", ""]
    ns = {"MODEL_DIR": str(model_dir), "image_paths": image_paths, "captions": captions}
    exec(block_with("Reranker.from_pretrained(MODEL_DIR)"), ns)  # noqa: S102
    want = EdjeModel.from_pretrained(model_dir).reranker.score(captions, pixel_values=ns["px"])
    for name in ("by_pixels", "by_vision_tokens", "by_stored_tokens"):
        got = ns[name]
        assert got.shape == (3,) and got.grad_fn is None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert capsys.readouterr().out.startswith("[")

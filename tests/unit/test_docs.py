"""The README and docs/ hold together: relative links resolve, cited results files exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "CHANGELOG.md"], ids=lambda p: p.name)
def test_cited_results_files_exist(page):
    text = page.read_text()
    for name in re.findall(r"`(?:benchmarks/results/)?([\w.{},-]+\.(?:json|jsonl|log|txt|png))`", text):
        if "{" in name:  # eval_x_seed{1,2}.json: each expansion must exist
            head, body, tail = re.match(r"(.*)\{(.*?)\}(.*)", name).groups()
            names = [head + part + tail for part in body.split(",")]
        else:
            names = [name]
        for n in names:
            if n in {"gallery.png", "bench.png"} or not re.match(r"(eval_|demo_|gpu|scale|serve|bench|build|fidelity|"
                                                              r"autofaiss|startup|reranker_step|readme_)", n):
                continue
            assert (RESULTS / n).is_file(), f"{page.name} cites benchmarks/results/{n}, which does not exist"


def test_no_reference_to_files_outside_the_repository():
    for page in PAGES:
        assert "DESIGN" + ".md" not in page.read_text(), page.name

"""The benchmark block of docs/benchmarks.md is exactly what the committed results files render."""
from __future__ import annotations

from benchmarks.report import DOC, doc_block, load, render


def test_docs_table_matches_latest_results():
    assert doc_block(DOC.read_text()) == render(*load())

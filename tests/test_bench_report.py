"""The README's benchmark block is exactly what the committed results files render."""
from __future__ import annotations

from benchmarks.report import README, load, readme_block, render


def test_readme_table_matches_latest_results():
    assert readme_block(README.read_text()) == render(*load())

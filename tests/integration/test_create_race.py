"""Creation races with a registered model name follow the README: one model written, both
builds finish with --wait, exit 75 (retry later) without it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from edje_search.storage.index_store import IndexStore

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _build(folder, index, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edje_search_cli.main", "build-index", str(folder), "--index",
                             str(index), "--model", "tiny-random", "--workers", "0", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _folders(shapes_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted((shapes_dir / "test").glob("*.png"))
    for folder, part in ((a, files[:10]), (b, files[10:20])):
        folder.mkdir()
        for f in part:
            shutil.copy(f, folder / f.name)
    return a, b


def test_two_racing_builds_with_a_registered_model_both_finish(shapes_dir, tmp_path):
    a, b = _folders(shapes_dir, tmp_path)
    index = tmp_path / "idx"
    procs = [_build(a, index, "--wait", "300"), _build(b, index, "--wait", "300")]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    store = IndexStore.open(index)
    assert len(store) == 20 and store.verify() == []
    assert [p.name for p in index.iterdir() if p.name == "model"] == ["model"]  # one model, inside the index


def test_a_build_refused_by_the_lock_exits_75_and_a_matching_name_is_accepted(shapes_dir, tmp_path):
    a, b = _folders(shapes_dir, tmp_path)
    index = tmp_path / "idx"
    first = _build(a, index)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    holder = IndexStore.open(index, mode="r+")
    with holder.writing():  # another writer is busy
        busy = _build(b, index)
        _, err = busy.communicate(timeout=600)
    assert busy.returncode == 75, err[-2000:]
    again = _build(b, index)  # the index's own model, given by its registered name
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert len(IndexStore.open(index)) == 20

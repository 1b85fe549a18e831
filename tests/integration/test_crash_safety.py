"""Crashes at every step of a commit leave the previous generation whole, and a resumed build
equals a clean one.

The default suite injects the crash deterministically between the commit's steps
(storage/layout.fault: the same points where kill -9 would hurt most); the slow suite keeps the
random kill -9 trials against the real command line.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edje_search import Engine
from edje_search.data.synthetic import make_dataset
from edje_search.storage import compaction, layout

POINTS = ["after_vectors", "after_tokens", "after_faiss", "after_manifest", "after_optimize_commit"]


class SimulatedCrash(BaseException):
    """Not an Exception: nothing on the way up may catch it and tidy the index."""


def _snapshot(index: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    engine = Engine.from_pretrained(index)
    assert engine.verify() == []
    entries = engine.store.entries
    rows = [e.row for e in entries]
    vecs, toks = engine.store.vectors(rows), engine.store.tokens.get(rows)
    return {e.path: (vecs[i], toks[i]) for i, e in enumerate(entries)}


def _build(images: Path, index: Path, model_dir: Path) -> None:
    engine = Engine.create_or_open(index, model=model_dir)
    engine.sync(images, num_workers=0, progress=False, batch_size=8, commit_every=8)


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory, tiny_model_dir, shapes_dir):
    index = tmp_path_factory.mktemp("clean") / "idx"
    _build(shapes_dir / "test", index, tiny_model_dir)
    return _snapshot(index)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("hit", [1, 3])
def test_crash_at_every_commit_step_keeps_the_index_whole(point, hit, tmp_path, tiny_model_dir, shapes_dir,
                                                          clean_build, monkeypatch):
    calls = {"n": 0}

    def crash_at(name: str) -> None:
        if name == point:
            calls["n"] += 1
            if calls["n"] == hit:
                raise SimulatedCrash(name)

    monkeypatch.setattr(layout, "fault", crash_at)
    index = tmp_path / "idx"
    # "after_optimize_commit" is reached once the FAISS segments are merged: force small merges
    monkeypatch.setattr(compaction, "MERGE_FANOUT", 2)
    with pytest.raises(SimulatedCrash):
        _build(shapes_dir / "test", index, tiny_model_dir)
    monkeypatch.setattr(layout, "fault", lambda name: None)
    engine = Engine.from_pretrained(index)  # the crashed index opens, verifies and answers
    assert engine.verify() == []
    if len(engine.store):
        assert engine.search("a red circle", k=1, rerank_k=1)
    _build(shapes_dir / "test", index, tiny_model_dir)  # the resumed build equals a clean one
    got = _snapshot(index)
    assert set(got) == set(clean_build)
    for path, (vec, tok) in clean_build.items():
        np.testing.assert_allclose(got[path][0], vec, atol=1e-5)
        np.testing.assert_allclose(got[path][1].astype(np.float32), tok.astype(np.float32), atol=2e-3)
    assert not list((index / "faiss").glob(".*tmp")) and not list(index.parent.glob(".idx.creating-*"))


def _build_cmd(images: Path, index: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "edje_search_cli", "build-index", str(images), "--index", str(index),
            "--model", str(model), "--workers", "0", "--batch-size", "8", "--commit-every", "16", "--no-progress"]


@pytest.mark.slow
def test_kill_during_build_twenty_trials(tmp_path, tiny_model_dir):
    make_dataset(tmp_path / "data", n_train=0, n_val=0, n_test=300, image_size=32, seed=5, progress=False)
    images = tmp_path / "data" / "test"
    clean = tmp_path / "clean"
    subprocess.run(_build_cmd(images, clean, tiny_model_dir), check=True, capture_output=True)
    reference = _snapshot(clean)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(20):
        index = tmp_path / f"crash{trial}"
        proc = subprocess.Popen(_build_cmd(images, index, tiny_model_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (index / "index.json").exists():
            engine = Engine.from_pretrained(index)
            assert engine.verify() == []
        done = subprocess.run(_build_cmd(images, index, tiny_model_dir), capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        got = _snapshot(index)
        assert set(got) == set(reference)
        for path, (vec, tok) in reference.items():
            np.testing.assert_allclose(got[path][0], vec, atol=1e-5)
            np.testing.assert_allclose(got[path][1].astype(np.float32), tok.astype(np.float32), atol=2e-3)


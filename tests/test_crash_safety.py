"""kill -9 at random moments during build-index: the index stays usable and resumes exactly."""
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


def _build_cmd(images: Path, index: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "edje_search_cli", "build-index", str(images), "--index", str(index),
            "--model", str(model), "--workers", "0", "--batch-size", "8", "--commit-every", "16", "--no-progress"]


def _snapshot(index: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    engine = Engine.from_pretrained(index)
    assert engine.store.verify() == []
    rows = [e.row for e in engine.store.entries]
    vecs, toks = engine.store.vectors(rows), engine.store.tokens.get(rows)
    return {e.path: (vecs[i], toks[i]) for i, e in enumerate(engine.store.entries)}


def _run_trials(n_trials: int, n_images: int, tmp_path: Path, tiny_model_dir: Path) -> None:
    make_dataset(tmp_path / "data", n_train=0, n_val=0, n_test=n_images, image_size=32, seed=5, progress=False)
    images = tmp_path / "data" / "test"
    clean = tmp_path / "clean"
    subprocess.run(_build_cmd(images, clean, tiny_model_dir), check=True, capture_output=True)
    reference = _snapshot(clean)
    assert len(reference) == n_images
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(n_trials):
        index = tmp_path / f"crash{trial}"
        proc = subprocess.Popen(_build_cmd(images, index, tiny_model_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (index / "index.json").exists():  # the index opens and answers with what was committed
            engine = Engine.from_pretrained(index)
            assert engine.store.verify() == []
            if len(engine.store):
                assert engine.search("a red circle", k=1, rerank_k=1)
        done = subprocess.run(_build_cmd(images, index, tiny_model_dir), capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        got = _snapshot(index)
        assert set(got) == {p.replace(str(clean.parent / "data"), str(clean.parent / "data")) for p in reference}
        for path, (vec, tok) in reference.items():
            np.testing.assert_allclose(got[path][0], vec, atol=1e-5)
            np.testing.assert_allclose(got[path][1].astype(np.float32), tok.astype(np.float32), atol=2e-3)


def test_kill_during_build_three_trials(tmp_path, tiny_model_dir):
    _run_trials(3, 120, tmp_path, tiny_model_dir)


@pytest.mark.slow
def test_kill_during_build_twenty_trials(tmp_path, tiny_model_dir):
    _run_trials(20, 300, tmp_path, tiny_model_dir)

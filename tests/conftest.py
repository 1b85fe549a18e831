"""Shared offline fixtures: a tiny random model, generated images, a built index."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from edje_search.data.synthetic import make_dataset
from edje_search.models.registry import build_tiny_model, bundled_minilm_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(seed=0).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    make_dataset(d, n_train=48, n_val=8, n_test=40, image_size=32, seed=1, progress=False)
    return d


@pytest.fixture(scope="session")
def _built_index(tmp_path_factory, tiny_model_dir, shapes_dir) -> Path:
    from edje_search import Engine, load_model

    d = tmp_path_factory.mktemp("index") / "idx"
    engine = Engine.create(d, load_model(tiny_model_dir))
    engine.sync(shapes_dir / "test", num_workers=0, progress=False, batch_size=16)
    return d


@pytest.fixture
def built_index(_built_index, tmp_path) -> Path:
    """A per-test copy of a 40-image index built with the tiny model."""
    d = tmp_path / "idx"
    shutil.copytree(_built_index, d)
    return d


@pytest.fixture
def docs_workspace(tmp_path, monkeypatch, tiny_model_dir, shapes_dir):
    """``make(n)``: a working folder (the current directory) holding ``./photos`` with ``n``
    generated test scenes, and ``$EDJE_HOME/models/edje-demo`` (the tiny random model), as the
    documentation's examples expect."""
    def make(n_images: int) -> Path:
        photos = tmp_path / "work" / "photos"
        photos.mkdir(parents=True)
        for src in sorted((shapes_dir / "test").glob("*.png"))[:n_images]:
            shutil.copy(src, photos / src.name)
        shutil.copytree(tiny_model_dir, tmp_path / "home" / "models" / "edje-demo")
        monkeypatch.setenv("EDJE_HOME", str(tmp_path / "home"))
        monkeypatch.chdir(tmp_path / "work")
        return tmp_path / "work"
    return make


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny BERT with the real uncased vocabulary, saved like a hub model directory."""
    d = tmp_path_factory.mktemp("tiny_lm")
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_first_stage_dir(tmp_path_factory) -> Path:
    """The first stage of the tiny random model, as a first-stage directory."""
    d = tmp_path_factory.mktemp("tiny_fs")
    build_tiny_model(seed=0).first_stage.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""A damaged model is refused where it is loaded, with the file named; NaN output raises."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edje_search import Engine, load_model
from edje_search.errors import ModelDamaged
from edje_search.inspection import verify_index


def _copy(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def _flip_exponents(path, n, seed=0):
    """XOR the top exponent bit of ``n`` float32 values in a safetensors file's data."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(seed)
    for off in rng.choice((len(data) - header) // 4, size=n, replace=False):
        data[header + 4 * int(off) + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_weights_are_refused_at_load_naming_the_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    weights = d / "first_stage" / "first_stage.safetensors"
    _flip_exponents(weights, 200)
    with pytest.raises(ModelDamaged, match=f"{weights}.*changed since it was saved"):
        load_model(d)


def test_truncated_and_deleted_weights_name_the_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    weights = d / "reranker" / "reranker.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelDamaged, match=f"{weights} is {size // 2} bytes, {size} when it was saved"):
        load_model(d)
    weights.unlink()
    with pytest.raises(ModelDamaged, match=f"missing: {weights}"):
        load_model(d)


def test_models_saved_without_file_records_still_get_the_header_check(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    info = json.loads((d / "edje.json").read_text())
    del info["files"]
    (d / "edje.json").write_text(json.dumps(info))
    load_model(d)  # loads as before
    weights = d / "first_stage" / "first_stage.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 3)
    with pytest.raises(ModelDamaged, match=f"{weights} is .* bytes, its header needs"):
        load_model(d)


def test_verify_names_a_deleted_weights_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    Engine.create(tmp_path / "idx", load_model(d))
    assert verify_index(tmp_path / "idx") == []
    (d / "first_stage" / "first_stage.safetensors").unlink()
    missing = d / "first_stage" / "first_stage.safetensors"
    assert verify_index(tmp_path / "idx") == [f"model weights file missing: {missing}"]


def test_a_nan_embedding_raises_instead_of_returning_no_hits(built_index):
    engine = Engine.from_pretrained(built_index)
    assert engine.search("a red circle", k=3)
    with torch.no_grad():
        next(engine.model.first_stage.parameters()).fill_(float("nan"))
    with pytest.raises(ModelDamaged, match="NaN or infinite text embeddings"):
        engine.search("a red circle", k=3)

"""Models from the Hugging Face hub cache, exercised offline with a hand-made cache directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from edje_search import load_model
from edje_search.models.first_stage import FirstStage
from edje_search.models.hub import save_open_clip_first_stage
from edje_search.models.builders import build_tiny_model, bundled_minilm_dir
from edje_search.models.names import ModelNotAvailable, model_arg_kind, split_hub_ref

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # as a machine without network would be configured (else each miss costs a minute of retries)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def add_repo(cache: Path, repo: str) -> Path:
    """The cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    return snapshot


def test_edje_model_repo_loads_from_the_cache(hub_cache):
    model = build_tiny_model(seed=3)
    model.save_pretrained(add_repo(hub_cache, "edje-test/tiny-edje"))
    loaded = load_model("hf-hub:edje-test/tiny-edje")
    assert loaded.fingerprint() == model.fingerprint()
    assert load_model(f"hf-hub:edje-test/tiny-edje@{REVISION}").fingerprint() == model.fingerprint()


def test_missing_repo_is_one_clear_message(hub_cache):
    with pytest.raises(ModelNotAvailable) as e:
        load_model("hf-hub:edje-test/not-there")
    msg = str(e.value)
    assert "edje-test/not-there" in msg and "huggingface-cli download" in msg and "\n" not in msg


def test_repo_without_edje_json_is_rejected(hub_cache):
    (add_repo(hub_cache, "edje-test/other") / "README.md").write_text("something else")
    with pytest.raises(ModelNotAvailable, match="not an edje-search model repo"):
        load_model("hf-hub:edje-test/other")


def _tiny_open_clip_cfg(hf_tokenizer: str | None) -> dict:
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    if hf_tokenizer:
        text.update(vocab_size=30522, hf_tokenizer_name=hf_tokenizer)
    return {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                            "head_width": 16}, "text_cfg": text}


@pytest.mark.parametrize("hf_tokenizer", [None, "edje-test/tokenizer"])
def test_open_clip_first_stage_from_the_cache(hub_cache, tmp_path, hf_tokenizer):
    if hf_tokenizer:  # SigLIP-style: the tokenizer is its own hub repo
        tok_dir = add_repo(hub_cache, hf_tokenizer)
        for f in bundled_minilm_dir().iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".onnx")):
                shutil.copy(f, tok_dir / f.name)
    cfg = _tiny_open_clip_cfg(hf_tokenizer)
    torch.manual_seed(0)
    source = open_clip.CLIP(**cfg).eval()
    repo = add_repo(hub_cache, "edje-test/tiny-clip")
    (repo / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                                              "resize_mode": "squash"}}))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, repo / "open_clip_model.safetensors")

    out = tmp_path / "first"
    save_open_clip_first_stage("hf-hub:edje-test/tiny-clip", out)
    first = FirstStage.from_pretrained(out)  # loads from the directory alone
    assert first.config.mean == (0.1, 0.2, 0.3) and first.config.resize_mode == "squash"
    assert first.config.tokenizer == ("hf" if hf_tokenizer else "openai")
    texts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        ids = first.tokenize(texts)
        ref = torch.nn.functional.normalize(source.encode_text(ids), dim=-1)
        torch.testing.assert_close(first.encode_text(texts), ref)
        pixels = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(first.encode_image(pixels)[0],
                                   torch.nn.functional.normalize(source.encode_image(pixels), dim=-1))
    if hf_tokenizer:
        assert ids[0, 0].item() == 101  # BERT [CLS]: the hub tokenizer was used, not CLIP's


def test_open_clip_weights_missing_offline_is_one_clear_message(hub_cache, tmp_path):
    with pytest.raises(ModelNotAvailable) as e:
        save_open_clip_first_stage("ViT-B-16-SigLIP2-256", tmp_path / "x", pretrained="webli")
    assert "\n" not in str(e.value) and "huggingface-cli download" in str(e.value)
    with pytest.raises(ModelNotAvailable, match="no pretrained tag"):
        save_open_clip_first_stage("ViT-B-16-SigLIP2-256", tmp_path / "x", pretrained="no-such-tag")
    with pytest.raises(ModelNotAvailable, match="no --pretrained tag given.*webli"):
        save_open_clip_first_stage("ViT-B-16-SigLIP2-256", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_import_leaves_no_directory(hub_cache, tmp_path):
    tok_dir = add_repo(hub_cache, "edje-test/tokenizer")  # the tokenizer is there, the weights are not
    for f in bundled_minilm_dir().iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".onnx")):
            shutil.copy(f, tok_dir / f.name)
    repo = add_repo(hub_cache, "edje-test/no-weights")
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": _tiny_open_clip_cfg("edje-test/tokenizer")}))
    out = tmp_path / "first"
    with pytest.raises(ModelNotAvailable, match="weights"):
        save_open_clip_first_stage("hf-hub:edje-test/no-weights", out)
    assert not out.exists()


def test_model_arguments_resolve_by_an_explicit_rule(tmp_path):
    assert split_hub_ref("hf-hub:org/name@abc") == ("org/name", "abc")
    assert split_hub_ref("hf-hub:org/name") == ("org/name", None)
    assert model_arg_kind("hf-hub:org/name") == "hub"
    assert model_arg_kind(tmp_path) == "directory" and model_arg_kind(str(tmp_path)) == "directory"
    assert model_arg_kind("edje-demo") == "recipe"
    # the prefix decides, never a substring
    assert model_arg_kind("my-hf-hub:copy") == "recipe"
    with pytest.raises(ModelNotAvailable, match="edje-demox"):
        load_model("edje-demox")

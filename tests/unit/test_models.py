"""Model parts: shapes, the pair layout, the three scoring inputs, save/load round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edje_search import EdjeModel, ModelMissing, Reranker
from edje_search.models.adapter import TokenCompressor, local_projector
from edje_search.models.builders import build_tiny_model


def test_compressor_shapes_and_official_names():
    comp = TokenCompressor(d_vision=48, d_lm=16, n_queries=5, n_heads=4, d_mlp=64)
    out = comp(torch.randn(3, 20, 48))
    assert out.shape == (3, 5, 16) and out.dtype == torch.float32
    names = set(comp.state_dict())
    assert {"query", "key.weight", "value.bias", "attention.in_proj_weight", "attention.out_proj.weight",
            "layernorm.weight", "mlp.fc1.weight", "mlp.fc2.bias", "projection.weight"} <= names
    assert comp.query.shape == (1, 5, 48)
    assert comp.layernorm.eps == 1e-6


def test_compressor_output_depends_on_every_token():
    comp = TokenCompressor(d_vision=16, d_lm=8, n_queries=2, n_heads=2, d_mlp=32)
    x = torch.randn(1, 6, 16, requires_grad=True)
    comp(x).sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_local_projector_is_per_token():
    proj = local_projector(16, 8, 32)
    x = torch.randn(2, 7, 16)
    out = proj(x)
    assert out.shape == (2, 7, 8)
    assert set(proj.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(out[:, 3], proj(x[:, 3:4])[:, 0])


def test_first_stage_gives_normalised_embedding_and_tokens():
    model = build_tiny_model()
    emb, tokens = model.first_stage.encode_image(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert tokens.shape == (2, 16, 32)  # (32 / 8)^2 patches, class token dropped
    text = model.embed_texts(["a red circle", "two blue squares"])
    assert text.shape == (2, 32)


def test_pair_encoding_layout():
    model = build_tiny_model(n_queries=4)
    r = model.reranker
    batch = r.encode_text(["a red circle left of a blue square", ""])
    image_id = r.tokenizer.convert_tokens_to_ids("<image>")
    cls_id, sep_id = r.tokenizer.cls_token_id, r.tokenizer.sep_token_id
    for i in range(2):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        types = batch["token_type_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert ids[0] == cls_id and ids[-1] == sep_id
        assert ids[-5:-1] == [image_id] * 4
        first_sep = ids.index(sep_id)
        assert all(t == 0 for t in types[: first_sep + 1]) and all(t == 1 for t in types[first_sep + 1:])
    assert batch["input_ids"][1][:2].tolist() == [cls_id, sep_id]  # empty caption


def test_only_the_caption_is_truncated():
    model = build_tiny_model(n_queries=4)
    batch = model.reranker.encode_text(["word " * 500])
    image_id = model.reranker.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["input_ids"].shape[1] == model.reranker.config.max_text_len + 4
    assert (batch["input_ids"][0] == image_id).sum() == 4


def test_three_inputs_give_the_same_scores():
    model = build_tiny_model()
    px = torch.randn(3, 3, 32, 32)
    caps = ["a red circle", "two small blue squares and a green triangle", ""]
    with torch.no_grad():
        vt = model.first_stage.encode_image(px)[1]
        a = model.reranker.score(caps, pixel_values=px)
        b = model.reranker.score(caps, vision_tokens=vt)
        c = model.reranker.score(caps, projected_tokens=model.reranker.project(vt))
    assert a.shape == (3,) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_scores_depend_on_the_image_tokens():
    model = build_tiny_model()
    with torch.no_grad():
        t = torch.randn(2, 4, 32)
        s = model.reranker.score(["a cat", "a cat"], projected_tokens=t)
    assert not torch.isclose(s[0], s[1])


def test_padding_does_not_change_scores():
    model = build_tiny_model()
    t = torch.randn(2, 4, 32)
    with torch.no_grad():
        together = model.reranker.score(["a cat", "a much longer caption about a dog in the snow"], projected_tokens=t)
        alone = model.reranker.score(["a cat"], projected_tokens=t[:1])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path):
    for variant in ("compressed", "local"):
        model = build_tiny_model(seed=3, variant=variant)
        px = torch.randn(2, 3, 32, 32)
        caps = ["a small red circle", "a large blue square above a small red circle"]
        with torch.no_grad():
            before = model.reranker.score(caps, pixel_values=px)
            emb_before = model.embed_texts(caps)
        model.save_pretrained(tmp_path / variant)
        loaded = EdjeModel.from_pretrained(tmp_path / variant)
        with torch.no_grad():
            assert torch.equal(loaded.reranker.score(caps, pixel_values=px), before)
            assert torch.equal(loaded.embed_texts(caps), emb_before)
        assert loaded.fingerprint() == model.fingerprint()
        assert loaded.reranker.config.variant == variant


def test_local_variant_stores_every_vision_token():
    model = build_tiny_model(variant="local")
    _, tokens = model.embed_images(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 16, 32)


def test_vision_token_count_comes_from_the_config():
    model = build_tiny_model()
    _, tokens = model.first_stage.encode_image(torch.randn(1, 3, 32, 32))
    assert model.first_stage.n_vision_tokens == tokens.shape[1] == 16
    assert model.reranker.config.n_vision_tokens == 16


@pytest.mark.parametrize("sub", ["", "reranker"])
def test_reranker_from_a_model_directory_scores_all_three_inputs(tiny_model_dir, sub):
    model = EdjeModel.from_pretrained(tiny_model_dir)
    reranker = Reranker.from_pretrained(tiny_model_dir / sub if sub else tiny_model_dir)
    px = torch.randn(2, 3, 32, 32)
    caps = ["a red circle", "two blue squares"]
    vt = model.first_stage.encode_image(px)[1]
    want = model.reranker.score(caps, pixel_values=px)
    for got in (reranker.score(caps, pixel_values=px), reranker.score(caps, vision_tokens=vt),
                reranker.score(caps, projected_tokens=reranker.project(vt))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_score_is_a_plain_tensor_without_grad():
    reranker = build_tiny_model().reranker.train()  # even in training mode and outside no_grad
    out = reranker.score(["a cat", "a dog"], projected_tokens=torch.randn(2, 4, 32, requires_grad=True))
    assert out.shape == (2,) and out.dtype == torch.float32
    assert not out.requires_grad and out.grad_fn is None and not out.is_inference()
    assert out.numpy().shape == (2,)


def test_a_bare_reranker_directory_refuses_pixels(tiny_model_dir, tmp_path):
    bare = Reranker.from_reranker_dir(tiny_model_dir / "reranker")
    with pytest.raises(ModelMissing, match="vision tower"):
        bare.score(["a cat"], pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ModelMissing):
        Reranker.from_pretrained(tmp_path)  # neither a model nor a reranker directory


def test_score_pairs_equals_scoring_each_pair_alone():
    reranker = build_tiny_model().reranker
    captions = ["a cat", "a much longer caption about a dog in the snow", "two squares"]
    tokens = torch.randn(5, 4, 32)
    cap_idx, tok_idx = np.array([1, 0, 2, 1, 0, 2, 1]), np.array([0, 4, 3, 2, 1, 0, 4])
    got = reranker.score_pairs(captions, tokens, cap_idx, tok_idx, batch_size=3)
    alone = [reranker.score([captions[c]], projected_tokens=tokens[t:t + 1]).item() for c, t in zip(cap_idx, tok_idx)]
    assert got.dtype == np.float32 and got.shape == (7,)
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-5)


def test_loaded_weights_are_a_private_mapping_of_the_file(tmp_path):
    """The first stage's parameters are the file's memory-mapped tensors: training one in place
    changes the model, never the file, and a save over the same directory loads back as saved."""
    build_tiny_model(seed=0).save_pretrained(tmp_path / "m")
    model = EdjeModel.from_pretrained(tmp_path / "m")
    name, param = next(iter(model.first_stage.clip.named_parameters()))
    before = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    again = dict(EdjeModel.from_pretrained(tmp_path / "m").first_stage.clip.named_parameters())[name]
    assert torch.equal(again, before)
    model.save_pretrained(tmp_path / "m")  # replaces the mapped file by rename
    saved = dict(EdjeModel.from_pretrained(tmp_path / "m").first_stage.clip.named_parameters())[name]
    assert torch.equal(saved, before + 1.0)


def test_skip_init_builds_uninitialised_then_restores_init():
    from edje_search.models.loading import skip_init

    with skip_init():
        torch.nn.init.normal_(torch.zeros(3))  # a no-op inside
        reranker = build_tiny_model(seed=0).reranker
    lm = reranker.language_model
    assert lm.cls.predictions.decoder.weight is not lm.bert.embeddings.word_embeddings.weight  # untied
    lm.tie_weights()
    assert lm.cls.predictions.decoder.weight is lm.bert.embeddings.word_embeddings.weight
    x = torch.zeros(1000)
    torch.nn.init.normal_(x)  # initialisation works again outside
    assert x.std() > 0.5

"""Official-layout checkpoints convert and score exactly like a hand-written reference forward."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, SiglipConfig, SiglipModel

from edje_search import EdjeModel, Reranker
from edje_search.convert import CheckpointError, convert_official
from edje_search.models.builders import bundled_minilm_dir

M, MLP, DV, H = 4, 48, 32, 32
CAPTIONS = ["a small red circle left of a large blue square", "", "word " * 120]


def official_layout_dirs(root: Path) -> tuple[Path, SiglipModel, object]:
    """Tiny random SigLIP and BERT directories under ``root``, as convert-official takes them."""
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": DV, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8}))
    siglip.save_pretrained(root / "siglip")
    tok.save_pretrained(root / "siglip")
    bert_cfg = BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=256)
    BertForMaskedLM(bert_cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root, siglip, tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return official_layout_dirs(tmp_path_factory.mktemp("official"))


def official_state(siglip: SiglipModel, tok, variant: str) -> dict:
    """A state dict in the official layout, with random reranker weights."""
    g = torch.Generator().manual_seed(1 if variant == "compressed" else 2)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok) + 1, hidden_size=H, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    state = {f"clip.{k}": v for k, v in siglip.state_dict().items()}
    state.update({f"vision_encoder.vision_model.{k}": v for k, v in siglip.vision_model.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in bert.state_dict().items()})
    state["text_embeddings.weight"] = bert.bert.embeddings.word_embeddings.weight
    if variant == "compressed":
        vp = {"query": r(1, M, DV), "key.weight": r(DV, DV), "key.bias": r(DV), "value.weight": r(DV, DV),
              "value.bias": r(DV), "attention.in_proj_weight": r(3 * DV, DV), "attention.in_proj_bias": r(3 * DV),
              "attention.out_proj.weight": r(DV, DV), "attention.out_proj.bias": r(DV),
              "layernorm.weight": 1 + r(DV), "layernorm.bias": r(DV), "mlp.fc1.weight": r(MLP, DV),
              "mlp.fc1.bias": r(MLP), "mlp.fc2.weight": r(DV, MLP), "mlp.fc2.bias": r(DV),
              "projection.weight": r(H, DV), "projection.bias": r(H)}
    else:
        vp = {"0.weight": r(MLP, DV), "0.bias": r(MLP), "2.weight": r(H, MLP), "2.bias": r(H)}
    state.update({f"vision_projection.{k}": v for k, v in vp.items()})
    state.update({"classification_head.0.dense.weight": r(H, H), "classification_head.0.dense.bias": r(H),
                  "classification_head.1.weight": r(1, H), "classification_head.1.bias": r(1),
                  "text_projection.weight": r(32, H), "text_projection.bias": r(32)})
    return state


def reference_adapter(s: dict, x: torch.Tensor, variant: str, heads: int = 4) -> torch.Tensor:
    p = lambda k: s[f"vision_projection.{k}"]  # noqa: E731
    if variant == "local":
        return F.linear(F.gelu(F.linear(x, p("0.weight"), p("0.bias"))), p("2.weight"), p("2.bias"))
    b = x.shape[0]
    k_in, v_in = F.linear(x, p("key.weight"), p("key.bias")), F.linear(x, p("value.weight"), p("value.bias"))
    wq, wk, wv = p("attention.in_proj_weight").chunk(3)
    bq, bk, bv = p("attention.in_proj_bias").chunk(3)
    q = F.linear(p("query").expand(b, -1, -1), wq, bq)
    k, v = F.linear(k_in, wk, bk), F.linear(v_in, wv, bv)
    split = lambda t: t.view(b, t.shape[1], heads, DV // heads).transpose(1, 2)  # noqa: E731
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(DV // heads), dim=-1) @ split(v)
    a = F.linear(att.transpose(1, 2).reshape(b, M, DV), p("attention.out_proj.weight"), p("attention.out_proj.bias"))
    h = a + F.linear(F.gelu(F.linear(F.layer_norm(a, (DV,), p("layernorm.weight"), p("layernorm.bias"), 1e-6),
                                      p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.linear(h, p("projection.weight"), p("projection.bias"))


def reference_score(s: dict, tok, caption: str, image_tokens: torch.Tensor) -> float:
    """[CLS] caption [SEP] <image>*m [SEP], types 0/1, <image> embeddings replaced, pooler + linear."""
    m = image_tokens.shape[0]
    image_id = len(tok)  # the appended row
    words = tok.convert_tokens_to_ids(tok.tokenize(caption))[: 64 + m - 3 - m]
    ids = [tok.cls_token_id] + words + [tok.sep_token_id] + [image_id] * m + [tok.sep_token_id]
    types = [0] * (len(words) + 2) + [1] * (m + 1)
    bert = BertModel(BertConfig(vocab_size=len(tok) + 1, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=256), add_pooling_layer=False).eval()
    bert.load_state_dict({k[len("language_model.bert."):]: v for k, v in s.items()
                          if k.startswith("language_model.bert.")})
    emb = s["language_model.bert.embeddings.word_embeddings.weight"][torch.tensor(ids)].clone()
    emb[len(words) + 2: len(words) + 2 + m] = image_tokens
    hidden = bert(inputs_embeds=emb[None], token_type_ids=torch.tensor([types])).last_hidden_state
    pooled = torch.tanh(F.linear(hidden[0, 0], s["classification_head.0.dense.weight"],
                                 s["classification_head.0.dense.bias"]))
    return float(F.linear(pooled, s["classification_head.1.weight"], s["classification_head.1.bias"]))


@pytest.mark.parametrize("variant", ["compressed", "local"])
def test_converted_checkpoint_matches_the_reference(dirs, tmp_path, variant):
    root, siglip, tok = dirs
    state = official_state(siglip, tok, variant)
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    model = convert_official(tmp_path / "ckpt.pt", root / "siglip", root / "bert", tmp_path / "model")
    model = EdjeModel.from_pretrained(tmp_path / "model")  # the saved directory, not the in-memory object
    assert model.reranker.config.variant == variant
    pixels = torch.randn(len(CAPTIONS), 3, 32, 32)
    with torch.no_grad():
        vision = siglip.vision_model(pixel_values=pixels).last_hidden_state  # (B, 16, DV)
        projected = reference_adapter(state, vision, variant)
        ref = torch.tensor([reference_score(state, tok, c, projected[i]) for i, c in enumerate(CAPTIONS)])
        got_px = model.reranker.score(CAPTIONS, pixel_values=pixels)
        got_vt = model.reranker.score(CAPTIONS, vision_tokens=vision)
        got_pt = model.reranker.score(CAPTIONS, projected_tokens=projected)
        emb, _ = model.first_stage.encode_image(pixels)
    for got in (got_px, got_vt, got_pt):
        assert got.shape == (len(CAPTIONS),)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb, F.normalize(siglip.vision_model(pixel_values=pixels).pooler_output, dim=-1))
    # the public entry point, from the model directory and from its reranker/ sub-directory
    for where in (tmp_path / "model", tmp_path / "model" / "reranker"):
        reranker = Reranker.from_pretrained(where)
        for got, kwargs in ((got_px, {"pixel_values": pixels}), (got_vt, {"vision_tokens": vision}),
                            (got_pt, {"projected_tokens": projected})):
            torch.testing.assert_close(reranker.score(CAPTIONS, **kwargs), got, atol=1e-5, rtol=1e-5)


def test_non_checkpoints_are_rejected(dirs, tmp_path):
    root, _, _ = dirs
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        convert_official(tmp_path / "junk.pt", root / "siglip", root / "bert", tmp_path / "out")
    torch.save({"state": {}}, tmp_path / "nomodel.pt")
    with pytest.raises(CheckpointError, match="'model'"):
        convert_official(tmp_path / "nomodel.pt", root / "siglip", root / "bert", tmp_path / "out")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        convert_official(tmp_path / "evil.pt", root / "siglip", root / "bert", tmp_path / "out")

"""A tiny SigLIP-style open_clip model (timm ViT, no class token, attention-pool head, SigLIP
text tower) through build-index and query: the code path of SigLIP2 first stages."""
from __future__ import annotations

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer

from edje_search import Engine
from edje_search.config import FirstStageConfig
from edje_search.models.bundle import EdjeModel
from edje_search.models.first_stage import FirstStage
from edje_search.models.builders import build_reranker, build_tiny_model


@register_model
def edje_test_vit_siglip_tiny(pretrained: bool = False, **kwargs):
    """Same family as timm's vit_*_patch16_siglip_*: no class token, MAP pooling."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="map")
    return _create_vision_transformer("edje_test_vit_siglip_tiny", pretrained=pretrained, **dict(args, **kwargs))


def tiny_siglip_first_stage() -> FirstStage:
    model_cfg = {
        "embed_dim": 32, "custom_text": True, "init_logit_bias": -10,
        "vision_cfg": {"image_size": 32, "timm_model_name": "edje_test_vit_siglip_tiny", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                     "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}},
    }
    return FirstStage(FirstStageConfig(model_cfg=model_cfg, image_size=32, context_length=16, resize_mode="squash"))


def test_tiny_siglip_style_model_indexes_and_queries(tmp_path, shapes_dir):
    assert "edje_test_vit_siglip_tiny" in timm.list_models("edje_test_*")
    torch.manual_seed(0)
    fs = tiny_siglip_first_stage()
    emb, tokens = fs.encode_image(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 32) and tokens.shape == (2, 16, 32)  # 16 patch tokens, no prefix token
    assert fs.n_vision_tokens == 16  # read from the timm tower's patch grid, not a forward pass
    tiny = build_tiny_model().reranker  # borrow its tiny BERT config and tokenizer
    reranker = build_reranker(fs, tiny.language_model.config, tiny.tokenizer, variant="compressed",
                              n_queries=4, mlp_dim=64)
    model = EdjeModel(fs, reranker, name="tiny-siglip")
    model.save_pretrained(tmp_path / "model")
    engine = Engine.create(tmp_path / "idx", EdjeModel.from_pretrained(tmp_path / "model"))
    report = engine.sync(shapes_dir / "test", num_workers=0, progress=False)
    assert report.added == 40
    hits = Engine.from_pretrained(tmp_path / "idx").search("a small red circle", k=5, rerank_k=10)
    assert len(hits) == 5 and all(h.rerank_score is not None for h in hits)

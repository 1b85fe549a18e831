"""The paper's configuration at full width (random weights, one layer deep): shapes and bytes per image.

Depth changes no shape, so the vision tower and the joint encoder are built with one layer;
every width, head count, patch size, image size and token count is the recipe's own.
"""
from __future__ import annotations

import numpy as np
import open_clip
import torch
from open_clip.model import _build_vision_tower
from timm.models import register_model
from timm.models.vision_transformer import vit_large_patch16_siglip_384
from transformers import AutoTokenizer, BertConfig

from edje_search.config import RerankerConfig
from edje_search.models.builders import bundled_minilm_dir
from edje_search.models.first_stage import encode_visual
from edje_search.models.recipes import PAPER_ARCHITECTURES, list_recipes
from edje_search.models.reranker import Reranker, add_image_token


@register_model
def edje_test_vit_large_patch16_siglip_384_one_layer(pretrained: bool = False, **kwargs):
    """timm's SigLIP ViT-L/16-384 (the paper's vision encoder) with 1 of its 24 blocks."""
    return vit_large_patch16_siglip_384(pretrained=pretrained, **dict(kwargs, depth=1))


def test_paper_recipe_shapes_at_full_width():
    arch = PAPER_ARCHITECTURES["edje-siglip2-l16-384"]
    cfg = open_clip.get_model_config(arch.open_clip_arch)
    assert cfg["vision_cfg"]["timm_model_name"] == arch.timm_vision == "vit_large_patch16_siglip_384"
    torch.manual_seed(0)
    vision_cfg = dict(cfg["vision_cfg"], timm_model_name="edje_test_vit_large_patch16_siglip_384_one_layer")
    visual = _build_vision_tower(cfg["embed_dim"], vision_cfg).eval()  # vision tower only
    assert len(visual.trunk.blocks) == 1
    with torch.no_grad():
        emb, tokens = encode_visual(visual, torch.randn(1, 3, 384, 384))
    assert emb.shape == (1, 1024) and tokens.shape == (1, 576, 1024)
    assert visual.trunk.patch_embed.num_patches == 576  # what FirstStage.n_vision_tokens reads
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    add_image_token(tok, "<image>")
    assert arch.lm_layers == 12 and arch.lm_width == 384
    bert = BertConfig(vocab_size=len(tok), hidden_size=arch.lm_width, num_hidden_layers=1, num_attention_heads=12,
                      intermediate_size=1536)
    rcfg = RerankerConfig(variant="compressed", vision_width=1024, vision_heads=visual.trunk.blocks[0].attn.num_heads,
                          n_queries=arch.n_queries, n_vision_tokens=576, mlp_dim=arch.mlp_dim, text_embed_dim=1024)
    reranker = Reranker(rcfg, bert, tok).eval()
    assert reranker.vision_projection.mlp.fc1.out_features == 8192 and rcfg.vision_heads == 16
    with torch.no_grad():
        stored = reranker.project(tokens).half().numpy()
    score = reranker.score(["dog in snow"], projected_tokens=torch.from_numpy(stored).float())
    assert stored.shape == (1, 64, 384) and stored[0].nbytes == 49_152
    assert score.shape == (1,) and np.isfinite(score.item())
    assert {"edje-siglip2-l16-384", "edje-siglip2-b16-256", "edje-demo"} <= {r.name for r in list_recipes()}

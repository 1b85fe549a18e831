"""The paper's configuration at full size (random weights): shapes and bytes per image."""
from __future__ import annotations

import numpy as np
import torch
from open_clip.model import _build_vision_tower
from transformers import AutoTokenizer, BertConfig

from edje_search.config import RerankerConfig
from edje_search.models.first_stage import encode_visual
from edje_search.models.registry import PAPER_ARCHITECTURES, bundled_minilm_dir, list_recipes
from edje_search.models.reranker import Reranker, add_image_token


def test_paper_recipe_shapes_at_full_size():
    import open_clip

    arch = PAPER_ARCHITECTURES["edje-siglip2-l16-384"]
    cfg = open_clip.get_model_config(arch.open_clip_arch)
    torch.manual_seed(0)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()  # vision tower only
    with torch.no_grad():
        emb, tokens = encode_visual(visual, torch.randn(1, 3, 384, 384))
    assert emb.shape == (1, 1024) and tokens.shape == (1, 576, 1024)
    tok = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    add_image_token(tok, "<image>")
    bert = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=arch.lm_layers, num_attention_heads=12,
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

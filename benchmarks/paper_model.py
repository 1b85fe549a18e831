"""The paper's `edje-siglip2-l16-384` shapes with random weights, for benchmarks that need full size.

SigLIP2 ViT-L/16-384 first stage (open_clip) + the m=64 compressed adapter + a MiniLM-L12-H384
joint encoder. Speed does not depend on the weights, and no pretrained SigLIP2 weights exist
offline. SigLIP2's tokenizer is a hub repository, so the bundled MiniLM tokenizer stands in for
it (its ids fit the 256k vocabulary).
"""
from __future__ import annotations

import copy

import torch

PAPER_NAME = "edje-siglip2-l16-384"


def paper_model(device: str | torch.device = "cpu", name: str = "edje-siglip2-l16-384-random", *,
                architecture: str = PAPER_NAME, image_size: int = 384):
    """Build the full-size model on ``device`` (built there directly: a GPU initialises it in a second);
    ``architecture`` a key of PAPER_ARCHITECTURES, ``image_size`` its input side."""
    import open_clip
    from transformers import AutoTokenizer, BertConfig

    from edje_search.config import FirstStageConfig
    from edje_search.models.bundle import EdjeModel
    from edje_search.models.first_stage import FirstStage
    from edje_search.models.registry import PAPER_ARCHITECTURES, build_reranker, bundled_minilm_dir

    arch = PAPER_ARCHITECTURES[architecture]
    cfg = copy.deepcopy(open_clip.get_model_config(arch.open_clip_arch))
    cfg["text_cfg"].pop("hf_tokenizer_name", None)
    torch.manual_seed(0)
    with torch.device(device):
        first = FirstStage(FirstStageConfig(model_cfg=cfg, image_size=image_size, context_length=64, tokenizer="hf",
                                            tokenizer_kwargs=dict(cfg["text_cfg"].get("tokenizer_kwargs", {}))),
                           tokenizer_dir=bundled_minilm_dir())
        tokenizer = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
        bert = BertConfig(hidden_size=arch.lm_width, num_hidden_layers=arch.lm_layers, num_attention_heads=12,
                          intermediate_size=4 * arch.lm_width)
        reranker = build_reranker(first, bert, tokenizer, variant="compressed", n_queries=arch.n_queries,
                                  mlp_dim=arch.mlp_dim)
    return EdjeModel(first, reranker, name=name).to(device).eval()

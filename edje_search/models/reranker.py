"""The reranker: adapter (vision tokens -> stored tokens) + joint encoder + tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from ..config import RerankerConfig, load_config, save_config
from .adapter import TokenCompressor, local_projector
from .backends import PairScorer, make_scorer
from .joint_encoder import JointEncoder, check_image_slots, encode_pairs

CONFIG_NAME = "reranker.json"
BERT_CONFIG_NAME = "bert_config.json"
WEIGHTS_NAME = "reranker.safetensors"
TOKENIZER_DIR = "tokenizer"


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str) -> int:
    """Register ``image_token`` as a special token (idempotent); return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return int(tokenizer.convert_tokens_to_ids(image_token))


def build_adapter(config: RerankerConfig, d_lm: int) -> nn.Module:
    if config.variant == "compressed":
        return TokenCompressor(config.vision_width, d_lm, config.n_queries, config.vision_heads,
                               config.mlp_dim, config.layer_norm_eps)
    return local_projector(config.vision_width, d_lm, config.mlp_dim)


class Reranker(nn.Module):
    """Scores (caption, image) pairs from vision tokens, stored tokens or pixels.

    Attribute names (``vision_projection``, ``language_model``, ``classification_head``,
    ``text_projection``) match the official EDJE checkpoint.
    """

    def __init__(self, config: RerankerConfig, bert_config: BertConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        image_token_id = add_image_token(tokenizer, config.image_token)
        if bert_config.vocab_size != len(tokenizer):
            raise ValueError(f"BERT vocab {bert_config.vocab_size} != tokenizer size {len(tokenizer)} "
                             f"(the <image> token must be in both)")
        self.vision_projection = build_adapter(config, bert_config.hidden_size)
        encoder = JointEncoder(bert_config, image_token_id, config.text_embed_dim)
        # Registered flat so the state dict reads language_model.*, classification_head.*, ...
        self.language_model = encoder.language_model
        self.classification_head = encoder.classification_head
        self.text_projection = encoder.text_projection
        self._encoder = [encoder]  # not a submodule: its parameters are the three above
        # Optional pixels -> vision tokens callable, attached by the model bundle.
        self.vision_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._scorer: PairScorer | None = None  # None: eager, straight through the modules

    # ------------------------------------------------------------------------------- backends
    @property
    def backend(self) -> str:
        return "eager" if self._scorer is None else self._scorer.name

    def use_backend(self, backend: str, *, cache_dir: str | Path | None = None) -> "Reranker":
        """Run scoring through ``backend`` (see :mod:`edje_search.models.backends`); returns self."""
        self._scorer = None if backend == "eager" else make_scorer(
            self.joint, backend, self.config.tokens_per_image, cache_dir=Path(cache_dir) if cache_dir else None)
        return self

    @property
    def joint(self) -> JointEncoder:
        return self._encoder[0]

    @property
    def token_width(self) -> int:
        return self.language_model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -------------------------------------------------------------------------------- forward
    def project(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Vision encoder tokens (B, n, D_v) -> stored tokens (B, m, D_lm)."""
        return self.vision_projection(vision_tokens)

    def encode_text(self, captions: list[str], n_image_tokens: int | None = None):
        n = self.config.tokens_per_image if n_image_tokens is None else n_image_tokens
        return encode_pairs(self.tokenizer, captions, n, self.config.image_token, self.config.max_text_len)

    def pair_hidden(self, captions: list[str], projected_tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Last hidden state (B, L, H) of each (caption, image) pair and the encoded batch."""
        batch = self.encode_text(captions, projected_tokens.shape[1]).to(projected_tokens.device)
        hidden = self.joint(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            projected_tokens)
        return hidden, batch

    def score(
        self,
        captions: list[str],
        *,
        vision_tokens: torch.Tensor | None = None,
        projected_tokens: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One logit per (caption, image) pair, as a 1-D tensor of length B.

        Give exactly one of ``vision_tokens`` (B, n, D_v), ``projected_tokens`` (B, m, D_lm)
        or ``pixel_values`` (B, 3, H, W; needs an attached vision encoder).
        """
        given = [x is not None for x in (vision_tokens, projected_tokens, pixel_values)]
        if sum(given) != 1:
            raise ValueError("give exactly one of vision_tokens, projected_tokens, pixel_values")
        if len(captions) == 0:
            return torch.empty(0)
        if pixel_values is not None:
            if self.vision_encoder is None:
                raise RuntimeError("this reranker has no vision encoder attached; load it with the full model")
            vision_tokens = self.vision_encoder(pixel_values.to(self.device))
        if vision_tokens is not None:
            projected_tokens = self.project(vision_tokens.to(self.device))
        param_dtype = next(self.parameters()).dtype
        projected_tokens = projected_tokens.to(self.device, param_dtype)
        if projected_tokens.shape[0] != len(captions):
            raise ValueError(f"{len(captions)} captions but {projected_tokens.shape[0]} images")
        if self._scorer is None:
            hidden, _ = self.pair_hidden(list(captions), projected_tokens)
            return self.joint.score_hidden(hidden).float()
        batch = self.encode_text(list(captions), projected_tokens.shape[1]).to(projected_tokens.device)
        check_image_slots(batch["input_ids"], self.joint.image_token_id, projected_tokens.shape[1])
        return self._scorer(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], projected_tokens)

    # ---------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_config(self.config, directory / CONFIG_NAME)
        self.language_model.config.to_json_file(str(directory / BERT_CONFIG_NAME))
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        save_model(self, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Reranker":
        directory = Path(directory)
        config = load_config(RerankerConfig, directory / CONFIG_NAME)
        bert_config = BertConfig.from_json_file(str(directory / BERT_CONFIG_NAME))
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
        model = cls(config, bert_config, tokenizer)
        load_model(model, str(directory / WEIGHTS_NAME), strict=True)
        return model.eval()

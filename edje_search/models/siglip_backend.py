"""First stage on transformers' SiglipModel (the backend the official EDJE checkpoints used).

Same interface as the open_clip :class:`~edje_search.models.first_stage.FirstStage`: one image
forward gives the pooled embedding (the attention-pooling head's output) and the vision
tokens (last hidden state after ``post_layernorm``).
"""
from __future__ import annotations


from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, SiglipConfig, SiglipModel

from ..config import FirstStageConfig
from .loading import map_weights, save_component, skip_init

CONFIG_NAME = "first_stage.json"
WEIGHTS_NAME = "first_stage.safetensors"
TOKENIZER_DIR = "tokenizer"


def siglip_first_stage_config(siglip: SiglipConfig) -> FirstStageConfig:
    v = siglip.vision_config
    return FirstStageConfig(model_cfg=siglip.to_dict(), image_size=v.image_size, mean=(0.5, 0.5, 0.5),
                            std=(0.5, 0.5, 0.5), resize_mode="squash", interpolation="bilinear",
                            context_length=siglip.text_config.max_position_embeddings, tokenizer="hf",
                            backend="hf-siglip")


class SiglipFirstStage(nn.Module):
    def __init__(self, config: FirstStageConfig, tokenizer_dir: str | Path, clip: SiglipModel | None = None):
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else SiglipModel(SiglipConfig.from_dict(dict(config.model_cfg)))
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.preprocess = open_clip.image_transform(
            config.image_size, is_train=False, mean=config.mean, std=config.std,
            resize_mode=config.resize_mode, interpolation=config.interpolation,
        )

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.vision_config.hidden_size)

    @property
    def vision_width(self) -> int:
        return int(self.clip.config.vision_config.hidden_size)

    @property
    def vision_heads(self) -> int:
        return int(self.clip.config.vision_config.num_attention_heads)

    @property
    def n_vision_tokens(self) -> int:
        v = self.clip.config.vision_config
        return (v.image_size // v.patch_size) ** 2

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (normalised pooled embedding (B, E), tokens (B, n, D_v))."""
        out = self.clip.vision_model(pixel_values=pixels)
        return F.normalize(out.pooler_output, dim=-1), out.last_hidden_state

    def tokenize(self, texts: list[str]) -> dict:
        # SigLIP was trained on max-length padded text
        return self.tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                              max_length=self.config.context_length, return_tensors="pt")

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        batch = self.tokenize(texts)
        out = self.clip.text_model(input_ids=batch["input_ids"].to(device))
        return F.normalize(out.pooler_output, dim=-1)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = save_component(directory, self.config, CONFIG_NAME, self.clip, WEIGHTS_NAME)
        if self.tokenizer_dir.resolve() != (directory / TOKENIZER_DIR).resolve():
            self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: FirstStageConfig) -> "SiglipFirstStage":
        directory = Path(directory)
        with skip_init():  # the mapped weights below replace every parameter
            model = cls(config, directory / TOKENIZER_DIR)
        missing, unexpected = map_weights(model.clip, directory / WEIGHTS_NAME)
        if missing or unexpected:
            raise ValueError(f"{directory}: first-stage weights do not match the config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()

    @classmethod
    def from_transformers_dir(cls, siglip_dir: str | Path, *, load_weights: bool = True) -> "SiglipFirstStage":
        """Build from a transformers SiglipModel directory (config, tokenizer, and its weights
        unless ``load_weights`` is False, e.g. when a checkpoint supplies them)."""
        if load_weights:
            siglip = SiglipModel.from_pretrained(str(siglip_dir))
        else:
            siglip = SiglipModel(SiglipConfig.from_pretrained(str(siglip_dir)))
        return cls(siglip_first_stage_config(siglip.config), siglip_dir, clip=siglip).eval()




"""First stage: an open_clip dual encoder that also exposes the vision encoder's tokens.

One image forward pass yields both the pooled, normalised embedding (for FAISS) and the
last hidden state of the vision encoder (for the adapter), as EDJE requires.
"""
from __future__ import annotations

import contextlib

import copy
import shutil
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from .loading import map_weights, save_component, skip_init
from ..config import FirstStageConfig, load_config

CONFIG_NAME = "first_stage.json"
WEIGHTS_NAME = "first_stage.safetensors"
TOKENIZER_DIR = "tokenizer"


def encode_visual(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of an open_clip vision tower -> (normalised pooled embedding, vision tokens).

    The tokens are the encoder's last hidden state after its final norm, without prefix
    (class) tokens: (B, n, D_v). Works for timm towers (SigLIP/SigLIP2) and open_clip ViTs.
    """
    if isinstance(visual, TimmModel):
        feats = visual.trunk.forward_features(pixels)  # (B, P + n, D_v), final norm applied
        pooled = visual.head(visual.trunk.forward_head(feats))  # (B, E)
        tokens = feats[:, getattr(visual.trunk, "num_prefix_tokens", 0):]
    elif isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ValueError("open_clip vision towers with attentional pooling are not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise ValueError(f"unsupported pool_type {visual.pool_type!r} for vision tokens")
        x = visual.transformer(visual._embeds(pixels))  # (B, 1 + n, D_v)
        pooled, tokens = visual._pool(x)  # ln_post applied to both
        if visual.proj is not None:
            pooled = pooled @ visual.proj
    else:
        raise TypeError(f"vision tower {type(visual).__name__} does not expose tokens")
    return F.normalize(pooled, dim=-1), tokens


class FirstStage(nn.Module):
    """Wraps an open_clip CLIP/CustomTextCLIP; see :meth:`encode_image` and :meth:`encode_text`."""

    def __init__(self, config: FirstStageConfig, tokenizer_dir: str | Path | None = None):
        super().__init__()
        self.config = config
        model_cfg = copy.deepcopy(config.model_cfg)
        text_cfg = model_cfg.get("text_cfg", {})
        if text_cfg.get("hf_model_name"):
            if tokenizer_dir is None:
                raise ValueError("a first stage with a Hugging Face text tower needs its tokenizer directory")
            # The HF text tower is rebuilt from the config stored beside the weights; weights
            # then come from our safetensors file, so nothing is fetched from a hub.
            text_cfg["hf_model_name"] = str(tokenizer_dir)
            text_cfg["hf_tokenizer_name"] = str(tokenizer_dir)
            text_cfg["hf_model_pretrained"] = False
        custom_text = model_cfg.pop("custom_text", False) or bool(text_cfg.get("hf_model_name"))
        model_cfg.pop("multimodal_cfg", None)
        cls = CustomTextCLIP if custom_text else CLIP
        self.clip = cls(**model_cfg)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.tokenizer = self._make_tokenizer()
        self.preprocess = open_clip.image_transform(
            config.image_size, is_train=False, mean=config.mean, std=config.std,
            resize_mode=config.resize_mode, interpolation=config.interpolation,
        )

    # ----------------------------------------------------------------------------- properties
    @property
    def embed_dim(self) -> int:
        return int(self.config.model_cfg["embed_dim"])

    @property
    def vision_width(self) -> int:
        visual = self.clip.visual
        if isinstance(visual, TimmModel):
            return int(visual.trunk.num_features)
        return int(visual.transformer.width)

    @property
    def vision_heads(self) -> int:
        visual = self.clip.visual
        if isinstance(visual, TimmModel):
            return int(visual.trunk.blocks[0].attn.num_heads)
        return int(visual.transformer.resblocks[0].attn.num_heads)

    @property
    def n_vision_tokens(self) -> int:
        """Tokens per image that :meth:`encode_image` returns: the patch grid (prefix tokens dropped)."""
        visual = self.clip.visual
        if isinstance(visual, TimmModel):
            return int(visual.trunk.patch_embed.num_patches)
        return int(visual.grid_size[0] * visual.grid_size[1])

    # ------------------------------------------------------------------------------- encoders
    def _make_tokenizer(self):
        cl = self.config.context_length
        if self.config.tokenizer == "hf":
            if self.tokenizer_dir is None or not self.tokenizer_dir.is_dir():
                raise FileNotFoundError(f"tokenizer directory missing: {self.tokenizer_dir}")
            return open_clip.tokenizer.HFTokenizer(
                str(self.tokenizer_dir), context_length=cl, **self.config.tokenizer_kwargs
            )
        if self.config.tokenizer == "openai":
            return open_clip.tokenizer.SimpleTokenizer(context_length=cl)
        raise ValueError(f"unknown tokenizer kind {self.config.tokenizer!r} (expected 'openai' or 'hf')")

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (normalised embedding (B, E), vision tokens (B, n, D_v))."""
        return encode_visual(self.clip.visual, pixels)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer([str(t) for t in texts])

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> normalised embeddings (B, E)."""
        device = next(self.parameters()).device
        ids = self.tokenize(texts).to(device)
        return F.normalize(self.clip.encode_text(ids), dim=-1)

    # ---------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        directory = save_component(directory, self.config, CONFIG_NAME, self.clip, WEIGHTS_NAME)
        if self.tokenizer_dir is not None and self.tokenizer_dir.resolve() != (directory / TOKENIZER_DIR).resolve():
            # tokenizer and architecture files only: the text weights are in our safetensors
            shutil.copytree(self.tokenizer_dir, directory / TOKENIZER_DIR, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5", "1_Pooling",
                                                          "README.md", ".gitattributes"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, load_weights: bool = True):
        """Load a first-stage directory of either backend (open_clip or transformers SigLIP)."""
        directory = Path(directory)
        config = load_config(FirstStageConfig, directory / CONFIG_NAME)
        if config.backend == "hf-siglip":
            from .siglip_backend import SiglipFirstStage

            return SiglipFirstStage.from_pretrained(directory, config)
        tok = directory / TOKENIZER_DIR
        with skip_init() if load_weights else contextlib.nullcontext():  # the weights below replace them
            model = cls(config, tokenizer_dir=tok if tok.is_dir() else None)
        if load_weights:
            missing, unexpected = map_weights(model.clip, directory / WEIGHTS_NAME)  # mapped, read when used
            # open_clip keeps some non-persistent buffers (e.g. attention masks) out of the file
            missing = [k for k in missing if not k.endswith("attn_mask")]
            if missing or unexpected:
                raise ValueError(f"{directory}: first-stage weights do not match the config "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()

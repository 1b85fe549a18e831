"""An EDJE model directory: first stage + reranker, saved side by side.

Layout::

    MODEL_DIR/
      edje.json                  name, format version, fusion weight, probability calibration
      first_stage/               first_stage.json, first_stage.safetensors, tokenizer/ (if HF text)
      reranker/                  reranker.json, bert_config.json, reranker.safetensors, tokenizer/
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..calibration import Calibration, match_probability
from ..errors import ModelDamaged
from ..fsutil import atomic_write_text
from .first_stage import FirstStage
from .reranker import Reranker

from .info import (BUNDLE_FILE, BundleInfo, check_weights, is_model_dir, read_bundle_info,  # noqa: F401
                   tensor_fingerprint, weight_file_records)


def _finite(x: torch.Tensor, what: str, model: "EdjeModel") -> torch.Tensor:
    """Non-finite outputs mean damaged weights (or a numeric blow-up): raise rather than let NaN
    scores silently empty a result list or enter the index."""
    if not bool(torch.isfinite(x).all()):
        raise ModelDamaged(f"model {model.path or model.name} computed NaN or infinite {what}: its weights are "
                           f"damaged or it overflows (run `edje-search verify`)")
    return x


class EdjeModel:
    """The two trained parts a search engine needs, plus what identifies them."""

    def __init__(self, first_stage: FirstStage, reranker: Reranker, name: str = "unnamed",
                 fusion_weight: float = 0.0, calibration: Calibration | None = None):
        self.first_stage = first_stage
        self.reranker = reranker
        self.name = name
        self.fusion_weight = float(fusion_weight)
        self.calibration = calibration  # logit -> match probability (calibration.py); None: sigmoid
        self.path: Path | None = None
        self._fingerprint: str | None = None
        reranker.attach_vision_encoder(first_stage)

    @property
    def device(self) -> torch.device:
        return self.reranker.device

    def to(self, device: str | torch.device) -> "EdjeModel":
        self.first_stage.to(device)
        self.reranker.to(device)
        return self

    def eval(self) -> "EdjeModel":
        self.first_stage.eval()
        self.reranker.eval()
        return self

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (normalised embeddings (B, E) fp32, stored tokens (B, m, D_lm) fp32)."""
        emb, vision_tokens = self.first_stage.encode_image(pixels.to(self.device))
        return (_finite(emb.float(), "image embeddings", self),
                _finite(self.reranker.project(vision_tokens).float(), "image tokens", self))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return _finite(self.first_stage.encode_text(list(texts)).float(), "text embeddings", self)

    def match_probability(self, logits) -> np.ndarray:
        """Joint-encoder logits -> match probabilities (float64): the stored calibration, or
        ``sigmoid(logit)`` for an uncalibrated model (ordered right, not a probability)."""
        return match_probability(logits, self.calibration)

    def fingerprint(self) -> str:
        """Hash of the saved weights (tensor_fingerprint), stored in edje.json when they were saved,
        so opening a model never re-hashes gigabytes; identifies what produced an index's rows."""
        if self._fingerprint is None:
            if self.path is None:
                raise RuntimeError("fingerprint() needs a saved model; call save_pretrained first")
            self._fingerprint = tensor_fingerprint(self.path)  # edje.json without a fingerprint: hash once
        return self._fingerprint

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.first_stage.save_pretrained(directory / "first_stage")
        self.reranker.save_pretrained(directory / "reranker")
        self.path = directory.resolve()
        self._fingerprint = tensor_fingerprint(self.path)
        self.save_info()
        return directory

    def save_info(self) -> None:
        """(Re)write ``edje.json`` alone, atomically (name, fusion weight, calibration)."""
        if self.path is None:
            raise RuntimeError("save_info() needs a saved model; call save_pretrained first")
        info = BundleInfo(self.name, fusion_weight=self.fusion_weight, fingerprint=self.fingerprint(),
                          files=weight_file_records(self.path),
                          calibration=self.calibration.to_dict() if self.calibration is not None else None)
        atomic_write_text(self.path / BUNDLE_FILE, json.dumps(dataclasses.asdict(info), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "EdjeModel":
        directory = Path(directory)
        if not is_model_dir(directory):
            raise FileNotFoundError(f"{directory} is not an edje-search model directory (no {BUNDLE_FILE})")
        info = read_bundle_info(directory)
        check_weights(directory, info)
        model = cls(FirstStage.from_pretrained(directory / "first_stage"),
                    Reranker.from_reranker_dir(directory / "reranker"), name=info.name,
                    fusion_weight=info.fusion_weight, calibration=Calibration.from_dict(info.calibration))
        model.path = directory.resolve()
        model._fingerprint = info.fingerprint or None
        return model.eval()

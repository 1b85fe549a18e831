"""An EDJE model directory: first stage + reranker, saved side by side.

Layout::

    MODEL_DIR/
      edje.json                  name, format version, fusion weight
      first_stage/               first_stage.json, first_stage.safetensors, tokenizer/ (if HF text)
      reranker/                  reranker.json, bert_config.json, reranker.safetensors, tokenizer/
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .first_stage import FirstStage
from .reranker import Reranker

BUNDLE_FILE = "edje.json"


@dataclasses.dataclass(frozen=True)
class BundleInfo:
    """``edje.json``. Ranking score of a reranked hit = joint-encoder logit + ``fusion_weight`` x
    first-stage similarity (ALBEF and BLIP add their contrastive similarity to the matching score
    the same way); 0 ranks by the joint encoder alone, as the EDJE paper does. ``edje-search
    calibrate`` picks the weight on a validation split. Not part of the fingerprint: it changes
    no stored row."""

    name: str
    format_version: int = 1
    fusion_weight: float = 0.0


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class EdjeModel:
    """The two trained parts a search engine needs, plus what identifies them."""

    def __init__(self, first_stage: FirstStage, reranker: Reranker, name: str = "unnamed",
                 fusion_weight: float = 0.0):
        self.first_stage = first_stage
        self.reranker = reranker
        self.name = name
        self.fusion_weight = float(fusion_weight)
        self.path: Path | None = None
        self._fingerprint: str | None = None
        reranker.vision_encoder = lambda pixels: first_stage.encode_image(pixels)[1]

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
        return emb.float(), self.reranker.project(vision_tokens).float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.first_stage.encode_text(list(texts)).float()

    def fingerprint(self) -> str:
        """Hash of the saved configs and weights; identifies what produced an index's rows."""
        if self._fingerprint is None:
            if self.path is None:
                raise RuntimeError("fingerprint() needs a saved model; call save_pretrained first")
            files = [p for p in self.path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")
                     and p.name != BUNDLE_FILE and "tokenizer" not in p.parts]
            self._fingerprint = hash_files(files)
        return self._fingerprint

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.first_stage.save_pretrained(directory / "first_stage")
        self.reranker.save_pretrained(directory / "reranker")
        self.path = directory.resolve()
        self.save_info()
        self._fingerprint = None
        return directory

    def save_info(self) -> None:
        """(Re)write ``edje.json`` alone, atomically (name and fusion weight)."""
        if self.path is None:
            raise RuntimeError("save_info() needs a saved model; call save_pretrained first")
        info = BundleInfo(self.name, fusion_weight=self.fusion_weight)
        tmp = self.path / (BUNDLE_FILE + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
        tmp.replace(self.path / BUNDLE_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "EdjeModel":
        directory = Path(directory)
        if not is_model_dir(directory):
            raise FileNotFoundError(f"{directory} is not an edje-search model directory (no {BUNDLE_FILE})")
        info = BundleInfo(**json.loads((directory / BUNDLE_FILE).read_text()))
        model = cls(FirstStage.from_pretrained(directory / "first_stage"),
                    Reranker.from_pretrained(directory / "reranker"), name=info.name,
                    fusion_weight=info.fusion_weight)
        model.path = directory.resolve()
        return model.eval()

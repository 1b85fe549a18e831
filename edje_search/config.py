"""Frozen configuration dataclasses, stored as JSON beside the weights they describe."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass as pretty JSON (atomically: tmp file then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load_config(cls: type[T], path: str | Path) -> T:
    """Rebuild a dataclass from JSON, rejecting unknown keys with a clear error."""
    data = json.loads(Path(path).read_text())
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)} for {cls.__name__}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class FirstStageConfig:
    """A dual encoder built from an open_clip model config.

    ``model_cfg`` is open_clip's model config dict (embed_dim, vision_cfg, text_cfg, ...);
    ``tokenizer`` is ``"openai"`` for open_clip's bundled CLIP tokenizer or ``"hf"`` when the
    tokenizer files live in the model directory's ``tokenizer/`` folder.
    """

    model_cfg: dict
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    context_length: int = 64
    tokenizer: str = "openai"
    tokenizer_kwargs: dict = dataclasses.field(default_factory=dict)
    backend: str = "open_clip"  # "open_clip" or "hf-siglip" (transformers SiglipModel)

    def __post_init__(self) -> None:
        if self.backend not in ("open_clip", "hf-siglip"):
            raise ValueError(f"unknown first-stage backend {self.backend!r}")
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
    """The joint encoder and the adapter in front of it (DESIGN.md, architecture)."""

    variant: str  # "compressed" (attention adapter to n_queries tokens) or "local" (per-token MLP)
    vision_width: int  # D_v, width of the vision encoder's output tokens
    vision_heads: int  # heads of the adapter's attention (= the vision encoder's heads)
    n_queries: int  # m, compressed tokens per image (compressed variant)
    n_vision_tokens: int  # tokens per image the vision encoder emits (576 for L/16-384)
    mlp_dim: int = 8192
    layer_norm_eps: float = 1e-6
    text_embed_dim: int = 0  # D of the first-stage text embedding (recovery head); 0 = no head
    max_text_len: int = 64  # caption budget; pair length capped at max_text_len + tokens per image
    image_token: str = "<image>"

    def __post_init__(self) -> None:
        if self.variant not in ("compressed", "local"):
            raise ValueError(f"variant must be 'compressed' or 'local', got {self.variant!r}")

    @property
    def tokens_per_image(self) -> int:
        """Number of stored tokens per image (m, or every vision token for the local variant)."""
        return self.n_queries if self.variant == "compressed" else self.n_vision_tokens


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """What an index directory holds and which model produced it."""

    factory: str  # FAISS index_factory string, e.g. "Flat", "HNSW32,Flat"
    dim: int  # first-stage embedding width
    tokens_per_image: int
    token_width: int
    token_dtype: str  # "float16"
    model_path: str  # the model directory the index was built with
    model_fingerprint: str
    chunk_rows: int = 16
    format_version: int = 1

"""Frozen configuration dataclasses, stored as JSON beside the weights they describe."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from .fsutil import atomic_write_text

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # devices.precision_autocast
# First-stage candidates the joint encoder reranks when the caller does not say: the one default of
# the library, the CLI, the server and evaluation (docs/results.md, "How many candidates to rerank").
DEFAULT_RERANK_K = 20

T = TypeVar("T")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass as pretty JSON, atomically."""
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")


def load_config(cls: type[T], path: str | Path) -> T:
    """Rebuild a dataclass from JSON, rejecting unknown keys with a clear error."""
    return config_from_dict(cls, json.loads(Path(path).read_text()), path)


def config_from_dict(cls: type[T], data: dict, source: str | Path) -> T:
    """A dataclass from the JSON object read from ``source``, rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{source}: unknown config keys {sorted(unknown)} for {cls.__name__}")
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
    """The joint encoder and the adapter in front of it (docs/architecture.md)."""

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
    # "pooler": the paper's head (BERT pooler on the first position; official checkpoints);
    # "mean": the same dense + tanh + linear over the mean of every unmasked position
    score_head: str = "pooler"

    def __post_init__(self) -> None:
        if self.variant not in ("compressed", "local"):
            raise ValueError(f"variant must be 'compressed' or 'local', got {self.variant!r}")
        if self.score_head not in ("pooler", "mean"):
            raise ValueError(f"score_head must be 'pooler' or 'mean', got {self.score_head!r}")

    @property
    def tokens_per_image(self) -> int:
        """Number of stored tokens per image (m, or every vision token for the local variant)."""
        return self.n_queries if self.variant == "compressed" else self.n_vision_tokens


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """What an index directory holds and which model produced it.

    Paths inside it are relative to the index directory, so the folder can be moved or copied.
    """

    dim: int  # first-stage embedding width
    tokens_per_image: int
    token_width: int
    token_dtype: str = "float16"  # "float16", "float32" or "int8"
    token_shard_rows: int = 256  # rows per shard object of the token store (storage/zarr_rows.py)
    # rows per inner chunk of int8's scales (storage/token_store.py): 0 = a whole shard; int8
    # indexes whose index.json lacks this key have 1, one per row (IndexConfig.load says so)
    token_scale_chunk_rows: int = 0
    factory: str = "auto"  # FAISS factory string, or "auto": chosen by size (storage/vector_index.py)
    model_path: str = "model"  # the model directory: relative to the index, or absolute when outside it
    model_fingerprint: str = ""
    store_url: str = ""  # where vectors and tokens live: "" = inside the index; or an fsspec URL (s3://...)
    index_id: str = ""  # a random id given at creation: readers notice an index replaced at the same path
    format_version: int = 2

    @property
    def scale_chunk_rows(self) -> int:
        """Rows per inner chunk of int8's scales."""
        return self.token_scale_chunk_rows or self.token_shard_rows

    @classmethod
    def load(cls, path: str | Path) -> IndexConfig:
        """An index's config from its index.json (see :meth:`from_dict`)."""
        return cls.from_dict(json.loads(Path(path).read_text()), path)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path) -> IndexConfig:
        """An index's config from index.json's object, keys the file predates filled in as they
        were when it was written."""
        # written before the key: int8 scales one row per chunk
        return config_from_dict(cls, {"token_scale_chunk_rows": 1, **data}, source)

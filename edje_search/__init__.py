"""edje-search: two-stage image-text retrieval with an efficient discriminative joint encoder."""
from __future__ import annotations

from .config import FirstStageConfig, IndexConfig, RerankerConfig
from .engine import BuildReport, Engine, Hit, ModelMismatch
from .models.bundle import EdjeModel
from .models.first_stage import FirstStage
from .models.registry import ModelNotAvailable, list_recipes, load_model
from .models.reranker import Reranker

__all__ = [
    "BuildReport", "EdjeModel", "Engine", "FirstStage", "FirstStageConfig", "Hit", "IndexConfig",
    "ModelMismatch", "ModelNotAvailable", "Reranker", "RerankerConfig", "list_recipes", "load_model",
]
__version__ = "0.1.0"

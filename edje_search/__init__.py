"""edje-search: two-stage text-to-image search with an efficient discriminative joint encoder (EDJE).

The public surface is what this package exports::

    from edje_search import Engine, EdjeModel, Reranker, load_model, Hit, EdjeError

Names are imported on first use (PEP 562), so ``import edje_search`` and the exceptions cost
no torch import; ``Engine`` or ``load_model`` pull in the model code when first touched.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (BadInput, BadQuery, CheckpointError, EdjeError, IndexCorrupt, IndexExists, IndexLocked,
                     ModelMismatch, ModelMissing, StorageUnavailable)
from .models.names import BACKENDS, ModelNotAvailable

__version__ = "0.1.0"

# public name -> module that defines it (imported when the name is first used)
_LAZY = {
    "Engine": ".engine", "Hit": ".engine", "BuildReport": ".engine",
    "EdjeModel": ".models.bundle", "Reranker": ".models.reranker", "FirstStage": ".models.first_stage",
    "load_model": ".models.registry", "list_recipes": ".models.recipes",
    "FirstStageConfig": ".config", "IndexConfig": ".config", "RerankerConfig": ".config",
}

__all__ = [
    "BACKENDS", "BadInput", "BadQuery", "BuildReport", "CheckpointError", "EdjeError", "EdjeModel", "Engine",
    "FirstStage", "FirstStageConfig", "Hit", "IndexConfig", "IndexCorrupt", "IndexExists", "IndexLocked",
    "ModelMismatch", "ModelMissing", "ModelNotAvailable", "Reranker", "RerankerConfig", "StorageUnavailable",
    "list_recipes", "load_model",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below does the import
    from .config import FirstStageConfig, IndexConfig, RerankerConfig
    from .engine import BuildReport, Engine, Hit
    from .models.bundle import EdjeModel
    from .models.first_stage import FirstStage
    from .models.recipes import list_recipes
    from .models.registry import load_model
    from .models.reranker import Reranker


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

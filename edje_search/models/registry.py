"""The rule that turns a model argument into a model (see :mod:`edje_search.models.names`).

``load_model`` is the one entry point: ``hf-hub:`` repos go through the Hugging Face cache,
directories load as model directories, anything else must be a registered recipe
(:mod:`edje_search.models.recipes`). Nothing is downloaded at import.
"""
from __future__ import annotations

from pathlib import Path

from .builders import build_reranker, build_tiny_model, bundled_minilm_dir, tiny_first_stage_config
from .bundle import EdjeModel, is_model_dir
from .names import ModelNotAvailable, model_arg_kind
from .recipes import PAPER_ARCHITECTURES, Recipe, get_recipe, list_recipes, model_home

__all__ = [  # the builders and recipes are re-exported for code that imported them from here
    "PAPER_ARCHITECTURES", "ModelNotAvailable", "Recipe", "build_reranker", "build_tiny_model", "bundled_minilm_dir",
    "list_recipes", "load_model", "model_home", "tiny_first_stage_config",
]


def load_model(name_or_dir: str | Path) -> EdjeModel:
    """Load a model from an ``hf-hub:`` repo, a model directory or a registered recipe name."""
    kind = model_arg_kind(name_or_dir)
    if kind == "hub":
        from .hub import hub_snapshot

        snapshot = hub_snapshot(str(name_or_dir))
        if not is_model_dir(snapshot):
            raise ModelNotAvailable(f"{name_or_dir} is not an edje-search model repo (it has no edje.json); "
                                    f"for an open_clip first stage use `edje-search import-first-stage`")
        return EdjeModel.from_pretrained(snapshot)
    if kind == "directory":
        path = Path(name_or_dir).expanduser()
        if not is_model_dir(path):
            raise ModelNotAvailable(f"{path} is a directory but not an edje-search model directory "
                                    f"(it has no edje.json)")
        return EdjeModel.from_pretrained(path)
    return get_recipe(str(name_or_dir)).load()

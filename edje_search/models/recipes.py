"""Named models: what ``--model NAME`` can be, and where each one's weights come from.

A recipe only says how to obtain a model; :mod:`edje_search.models.builders` assembles parts
and :func:`edje_search.models.registry.load_model` applies the naming rule. Listing recipes
imports no torch (`edje-search models` starts fast); loading one imports the model code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .info import is_model_dir
from .names import ModelNotAvailable, edje_home

if TYPE_CHECKING:
    from .bundle import EdjeModel


def model_home() -> Path:
    """Where trained and converted models live by default (``$EDJE_HOME/models``)."""
    return edje_home() / "models"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    load: Callable[[], EdjeModel]


@dataclasses.dataclass(frozen=True)
class PaperArchitecture:
    """Shapes of a paper configuration (docs/architecture.md); weights come from a hub or a conversion."""

    open_clip_arch: str  # first stage and vision tokens
    open_clip_pretrained: str
    timm_vision: str  # the same vision tower as a timm model name
    language_model: str  # hub id of the joint encoder's starting point
    lm_layers: int
    n_queries: int = 64
    mlp_dim: int = 8192
    lm_width: int = 384


PAPER_ARCHITECTURES = {
    "edje-siglip2-l16-384": PaperArchitecture("ViT-L-16-SigLIP2-384", "webli", "vit_large_patch16_siglip_384",
                                              "microsoft/MiniLM-L12-H384-uncased", 12),
    "edje-siglip2-b16-256": PaperArchitecture("ViT-B-16-SigLIP2-256", "webli", "vit_base_patch16_siglip_256",
                                              "microsoft/MiniLM-L12-H384-uncased", 12),
}

_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> None:
    _RECIPES[recipe.name] = recipe


def list_recipes() -> list[Recipe]:
    return list(_RECIPES.values())


def get_recipe(name: str) -> Recipe:
    recipe = _RECIPES.get(name)
    if recipe is None:
        raise ModelNotAvailable(f"'{name}' is neither a model directory nor a known model "
                                f"(known: {', '.join(sorted(_RECIPES))}; see `edje-search models`)")
    return recipe


def _trained(name: str) -> Callable[[], EdjeModel]:
    """A model that exists once training on this machine has written it to ``model_home()/name``."""
    def load() -> EdjeModel:
        from .bundle import EdjeModel

        path = model_home() / name
        if not is_model_dir(path):
            raise ModelNotAvailable(
                f"model '{name}' has not been trained on this machine (looked in {path}); "
                f"run `make demo` or `edje-search train`, or pass --model DIR"
            )
        return EdjeModel.from_pretrained(path)
    return load


def _paper(name: str) -> Callable[[], EdjeModel]:
    """A paper model, present once a released checkpoint was converted into ``model_home()/name``."""
    arch = PAPER_ARCHITECTURES[name]

    def load() -> EdjeModel:
        from .bundle import EdjeModel

        path = model_home() / name
        if is_model_dir(path):
            return EdjeModel.from_pretrained(path)
        raise ModelNotAvailable(
            f"model '{name}' is not on this machine (looked in {path}). With network access, convert the "
            f"released EDJE checkpoint: `edje-search convert-official CKPT --vision-model SIGLIP_DIR "
            f"--language-model MINILM_DIR --out {path}` (SIGLIP_DIR/MINILM_DIR: local copies of the hub models "
            f"of the checkpoint, e.g. {arch.language_model}), or pass --model DIR or --model hf-hub:ORG/NAME")
    return load


def _tiny() -> EdjeModel:
    from .builders import build_tiny_model

    return build_tiny_model(0)


register(Recipe("tiny-random", "tiny random model of the full architecture (tests; no training)", _tiny))
register(Recipe("edje-demo", "small model trained offline by `make demo` on generated scenes",
                _trained("edje-demo")))
register(Recipe("edje-siglip2-l16-384", "paper: SigLIP2 ViT-L/16-384 + MiniLM-L12, 64 tokens x 384 (49,152 B/image)",
                _paper("edje-siglip2-l16-384")))
register(Recipe("edje-siglip2-b16-256", "CPU-friendlier: SigLIP2 ViT-B/16-256 + MiniLM-L12, 64 tokens x 384",
                _paper("edje-siglip2-b16-256")))

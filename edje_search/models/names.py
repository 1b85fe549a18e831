"""How model and backend names are spelled and told apart. Imports nothing heavy (no torch),
so the command line can build its options and check arguments without loading a model.

A model argument is, by an explicit rule and never by substring:

1. ``hf-hub:ORG/NAME[@REVISION]``: an edje-search model repo in the Hugging Face cache;
2. an existing directory: a model directory (it must hold ``edje.json``);
3. otherwise a registered recipe name (``edje-search models``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelMissing

# How the reranker's scoring pass can run (edje_search.models.backends implements each one).
BACKENDS = ("eager", "bf16", "dynamic-int8", "onnx", "onnx-int8")

HUB_PREFIX = "hf-hub:"


class ModelNotAvailable(ModelMissing):
    """A named model cannot be loaded on this machine; the message says what to do."""


def edje_home() -> Path:
    """Root of edje-search's own files: ``$EDJE_HOME``, by default ``~/.cache/edje-search``."""
    return Path(os.environ.get("EDJE_HOME", Path.home() / ".cache" / "edje-search"))


def is_hub_ref(name: str | Path) -> bool:
    """True for ``hf-hub:ORG/NAME[@REVISION]`` (a repo in the Hugging Face cache)."""
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` (the prefix is optional) -> (``ORG/NAME``, revision or None)."""
    repo = ref[len(HUB_PREFIX):] if is_hub_ref(ref) else ref
    repo, _, revision = repo.partition("@")
    return repo.strip("/"), revision or None


def model_arg_kind(name_or_dir: str | Path) -> str:
    """Which rule a model argument falls under: ``"hub"``, ``"directory"`` or ``"recipe"``."""
    if is_hub_ref(name_or_dir):
        return "hub"
    if Path(name_or_dir).expanduser().is_dir():
        return "directory"
    return "recipe"

"""Creating an index for a model, and opening one with the model it was built with.

The engine's constructors (:meth:`Engine.create`, :meth:`Engine.from_pretrained`) use these;
they hold the rules that tie an index to its model: a model built in memory is saved inside
the new index, an index records its model's path and weight fingerprint, and opening checks
that the model given (or found at the recorded path) has that fingerprint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import IndexConfig
from .errors import ModelMismatch, ModelMissing
from .models.bundle import EdjeModel
from .models.registry import load_model
from .storage.index_store import IndexStore

MODEL_SUBDIR = "model"  # where an index keeps a model that was built in memory


def create_index(index_dir: str | Path, model: EdjeModel, *, factory: str = "auto", token_dtype: str = "float16",
                 store_url: str = "", lock_wait: float = 0.0) -> IndexStore:
    """A new, empty index for ``model``, created atomically (see :meth:`Engine.create`)."""
    index_dir = Path(index_dir)
    inside = model.path is None  # a model built in memory is kept inside the index
    config = IndexConfig(
        factory=factory, dim=model.first_stage.embed_dim,
        tokens_per_image=model.reranker.config.tokens_per_image,
        token_width=model.reranker.token_width, token_dtype=token_dtype,
        model_path=MODEL_SUBDIR if inside else str(model.path), model_fingerprint="", store_url=store_url,
    )

    def populate(tmp: Path) -> IndexConfig:
        # a model built in memory is saved inside the new index, which gives its fingerprint
        model.save_pretrained(tmp / MODEL_SUBDIR)
        return dataclasses.replace(config, model_fingerprint=model.fingerprint())

    if inside:
        store = IndexStore.create(index_dir, config, populate=populate)
        model.path = (index_dir / MODEL_SUBDIR).resolve()
    else:
        store = IndexStore.create(index_dir, dataclasses.replace(config, model_fingerprint=model.fingerprint()))
    store.lock.wait = lock_wait
    return store


def _saved_twin(store: IndexStore, model: EdjeModel, index_dir) -> EdjeModel:
    """The index's saved model when ``model``, built in memory, has the same weights (a racing
    or repeated `build-index --model tiny-random`); ModelMismatch otherwise."""
    from .models.loading import weights_hash

    saved = load_model(store.model_dir) if store.model_dir.is_dir() else None
    if saved is None or any(weights_hash(getattr(saved, part)) != weights_hash(getattr(model, part))
                            for part in ("first_stage", "reranker")):
        raise ModelMismatch(f"an index already exists in {index_dir}, built with another model than "
                            f"{model.name}: use that model or build a new index")
    return saved


def open_index(index_dir: str | Path, model: EdjeModel | str | Path | None = None, *, writable: bool = False,
               lock_wait: float = 0.0) -> tuple[IndexStore, EdjeModel]:
    """The index and its model: ``model`` (a model, directory or name) or, when None, the one at
    the path the index recorded; refused unless its fingerprint is the index's."""
    store = IndexStore.open(index_dir, mode="r+" if writable else "r", lock_wait=lock_wait)
    if model is None:
        model_path = store.model_dir
        if not model_path.is_dir():
            raise ModelMissing(f"the model this index was built with is gone: {model_path} "
                               f"(pass --model with that model)")
        model = load_model(model_path)
    elif isinstance(model, (str, Path)):
        model = load_model(model)
    if model.path is None:  # built in memory (a registered name): usable if it is the index's own model
        model = _saved_twin(store, model, index_dir)
    if model.fingerprint() != store.config.model_fingerprint:
        raise ModelMismatch(
            f"index {index_dir} was built with model {store.config.model_fingerprint} "
            f"({store.config.model_path}) but the model given is {model.fingerprint()} ({model.path}); "
            f"use that model or rebuild the index")
    if writable and not store.model_dir.is_dir():
        with store.writing():  # the model moved: remember where it is now
            store.record_model_dir(model.path)
    return store, model

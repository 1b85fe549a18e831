"""What an index holds and whether it is whole, read without loading a model (no torch import),
so that `edje-search info` and `verify` answer in a fraction of a second."""
from __future__ import annotations

from pathlib import Path

from .errors import IndexCorrupt, ModelDamaged
from .models.info import check_weights, read_bundle_info, tensor_fingerprint
from .storage.index_store import IndexStore
from .storage.token_store import bytes_per_image


def verify_index(directory: str | Path) -> list[str]:
    """Problems found (empty = healthy): the store's own checks (storage/integrity.py) plus the
    model's weights against the fingerprint the index was built with."""
    try:
        store = IndexStore.open(directory)
    except IndexCorrupt as e:
        return [str(e)]
    return store.verify() + model_problems(store)


def model_problems(store: IndexStore) -> list[str]:
    """The index's model directory is there, readable, and holds the weights the index was built with."""
    model_dir = store.model_dir
    if not model_dir.is_dir():
        return [f"the model this index was built with is gone: {model_dir}"]
    try:
        check_weights(model_dir, read_bundle_info(model_dir))
        got = tensor_fingerprint(model_dir)
    except ModelDamaged as e:
        return [str(e)]
    except (OSError, ValueError, TypeError) as e:
        return [f"model {model_dir} is unreadable: {e}"]
    if got != store.config.model_fingerprint:
        return [f"model weights in {model_dir} have fingerprint {got}, the index was built "
                f"with {store.config.model_fingerprint}"]
    return []


def index_info(directory: str | Path) -> dict:
    """The store's summary plus the bytes per image and the name of the model that built it."""
    store = IndexStore.open(directory)
    data = store_summary(store)
    try:
        bundle = read_bundle_info(store.model_dir)
    except (OSError, ValueError, TypeError) as e:
        data["model_name"] = f"(unreadable: {e})"
    else:
        data["model_name"], data["fusion_weight"] = bundle.name, bundle.fusion_weight
    return data


def store_summary(store: IndexStore) -> dict:
    """Size, generation, FAISS recipe, row shapes, storage place and model of an open index."""
    cfg = store.config
    return {
        "index": str(store.directory), "images": len(store), "rows": store.n_rows, "generation": store.generation,
        "factory": cfg.factory, "recipe": store.recipe, "nprobe": store.settings.get("nprobe"),
        "faiss_segments": len(store.faiss_files), "dim": cfg.dim, "tokens_per_image": cfg.tokens_per_image,
        "token_width": cfg.token_width, "token_dtype": cfg.token_dtype,
        "token_store": f"{store.tokens.url} (Zarr v3, {cfg.token_shard_rows} rows per shard)",
        "store": cfg.store_url or "(inside the index)", "model": cfg.model_path,
        "model_fingerprint": cfg.model_fingerprint,
        "bytes_per_image": bytes_per_image(cfg.tokens_per_image, cfg.token_width, cfg.token_dtype),
    }

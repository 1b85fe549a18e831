"""Which index a reader has open, so that it notices the folder being deleted or replaced.

An open SQLite connection and memory-mapped segments keep reading a deleted index's files (the
inodes live on until closed), so without this check a server would keep answering with rows of
an index that no longer exists. Each index gets a random ``index_id`` in ``index.json`` when it
is created; indexes created before that are identified by the manifest file's device and inode.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config import IndexConfig
from ..errors import IndexCorrupt, IndexGone
from .layout import CONFIG_FILE
from .manifest import MANIFEST_FILE, Manifest

if TYPE_CHECKING:
    from .index_store import IndexStore


def identity(store_dir, config: IndexConfig) -> str:
    if config.index_id:
        return config.index_id
    try:
        st = os.stat(store_dir / MANIFEST_FILE)
    except OSError:
        return ""
    return f"inode:{st.st_dev}:{st.st_ino}"


def replacement(store: IndexStore, read_config: Callable[[Path], IndexConfig]) -> IndexConfig | None:
    """The config of the index now at the store's folder (read by ``read_config``) when it is
    another index than the one open; None when it is the same. Raises IndexGone when the folder
    or its index was removed."""
    if not (store.directory / CONFIG_FILE).is_file() or not (store.directory / MANIFEST_FILE).is_file():
        raise IndexGone(f"index {store.directory} was removed (restore it or build it again)")
    try:
        config = read_config(store.directory)
    except IndexCorrupt as e:
        raise IndexGone(f"index {store.directory} was replaced by an unreadable one: {e}") from e
    return None if identity(store.directory, config) == store.identity else config


def reopen(store: IndexStore, config: IndexConfig) -> None:
    """Switch a read-only store to the index that replaced its own, when the model that embedded
    its rows is the same one (a server's model cannot be swapped under it)."""
    if store.mode != "r" or config.model_fingerprint != store.config.model_fingerprint:
        raise IndexGone(f"index {store.directory} was replaced by one built with another model "
                        f"({config.model_fingerprint or 'unknown'}): open it anew (restart the server)")
    old = store.manifest
    store.__init__(store.directory, config, Manifest(store.directory / MANIFEST_FILE), mode="r")
    old.close()


def follow(store: IndexStore, read_config: Callable[[Path], IndexConfig]) -> bool:
    """True when the store was switched to the index that replaced its own (see :func:`reopen`)."""
    replaced = replacement(store, read_config)
    if replaced is not None:
        reopen(store, replaced)
    return replaced is not None

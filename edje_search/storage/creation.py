"""Creating an index directory atomically.

The new index is built in a temporary sibling folder and renamed into place, and a rename
replaces only an empty folder: of two processes creating the same index, one wins and the
other gets IndexExists, and a crash leaves either no index or a whole one (the next writer
removes the temporary folder).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from ..config import IndexConfig, save_config
from ..errors import BadInput, IndexExists
from . import vector_index
from .layout import CONFIG_FILE, FAISS_DIR
from .manifest import MANIFEST_FILE, Manifest
from .segments import is_remote
from .token_store import LAYOUT as TOKEN_LAYOUT
from .zarr_io import kvstore_spec


def create_index_dir(directory: Path, config: IndexConfig,
                     populate: Callable[[Path], IndexConfig | None] | None = None) -> None:
    """An empty index at ``directory``; ``populate(tmp)`` may add files to the folder before it
    is renamed into place (the model, for one built in memory) and return a final config."""
    if (directory / CONFIG_FILE).exists():
        raise IndexExists(f"an index already exists in {directory}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BadInput(f"{directory} exists and is not an empty folder: choose a new index folder")
    if config.factory != vector_index.AUTO:
        vector_index.new_index(config.factory, config.dim)  # validate the factory string early
    if config.store_url and not is_remote(config.store_url):
        raise BadInput(f"store URL {config.store_url!r} is not a URL (leave it empty to store inside the index)")
    if config.store_url:
        kvstore_spec(config.store_url)  # BadInput for a scheme the token store cannot reach
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.creating-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an index folder is as readable as any other
    try:
        (tmp / FAISS_DIR).mkdir()
        if populate is not None:
            config = populate(tmp) or config
        config = dataclasses.replace(config, index_id=uuid.uuid4().hex)
        m = Manifest(tmp / MANIFEST_FILE, readonly=False, create=True)
        m.initialise({"token_store": TOKEN_LAYOUT})
        m.close()
        save_config(config, tmp / CONFIG_FILE)
        try:
            os.rename(tmp, directory)  # replaces only an empty folder; fails if another creator won
        except OSError as e:
            if (directory / CONFIG_FILE).exists():
                raise IndexExists(f"an index already exists in {directory}") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

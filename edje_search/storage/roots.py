"""Where indexed folders really were when their files were indexed.

Every writer that embeds files records, for each folder holding one, the folder's absolute
path and its fully resolved location (``os.path.realpath``) at that moment, in
``INDEX/roots.json``. The server serves a file only if the file's resolved location today is
still inside the resolved location recorded for its folder: a file, or any folder on the way
to it, later swapped for a symlink to somewhere else is refused, whatever that place holds.

A JSON side file rather than a manifest column: the record is per folder (thousands, not
millions), it is written under the writer lock like the manifest, and readers that predate
it simply find no record.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterable

from ..fsutil import atomic_write_bytes

ROOTS_FILE = "roots.json"


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # unreadable or damaged: treated as no record (the stricter default)
        return {}
    folders = data.get("folders", {}) if isinstance(data, dict) else {}
    return {k: v for k, v in folders.items() if isinstance(k, str) and isinstance(v, str)}


def record_folders(index_dir: str | Path, files: Iterable[str]) -> int:
    """Record the resolved location of each folder holding one of ``files`` (absolute paths);
    call with the writer lock held. Returns how many records were new or changed."""
    path = Path(index_dir) / ROOTS_FILE
    known = _load(path)
    changed = 0
    for folder in {os.path.dirname(os.path.abspath(f)) for f in files}:
        real = os.path.realpath(folder)
        if known.get(folder) != real:
            known[folder] = real
            changed += 1
    if changed:
        text = json.dumps({"folders": dict(sorted(known.items()))}, ensure_ascii=False, indent=0)
        # surrogateescape: folder names that are not UTF-8 (os.fsdecode'd bytes) round-trip
        atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))
    return changed


class IndexedFolders:
    """The recorded folders of one index, re-read when the file changes (a reader's view)."""

    def __init__(self, index_dir: str | Path):
        self.path = Path(index_dir) / ROOTS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._folders: dict[str, str] = {}

    def _current(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._folders = _load(self.path) if stamp else {}
                self._stamp = stamp
            return self._folders

    def recorded_real_folder(self, file_path: str) -> str | None:
        """The resolved location recorded for the folder holding ``file_path``, or None."""
        return self._current().get(os.path.dirname(os.path.abspath(file_path)))

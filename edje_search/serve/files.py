"""Serving indexed image files and their thumbnails, and nothing else.

A file is served only through its row in the open generation (the URL never carries a path),
only if it is a regular file whose real location is inside the real location its folder had
when it was indexed (recorded in INDEX/roots.json: a symlink swapped in for the file or for any
folder on the way to it is refused with 403), and only if its bytes are an image. Indexes
built before folders were recorded fall back to the file's current folder (re-run build-index
to record them).
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import stat
import threading

from PIL import Image

from ..images import DecodeLimits, decode_untrusted
from ..storage.roots import IndexedFolders

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
               "BMP": "image/bmp", "TIFF": "image/tiff", "MPO": "image/jpeg"}
MAX_FILE_BYTES = 256 * 1024 * 1024


class FileRefused(Exception):
    """The indexed file cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _locate(path: str, folders: IndexedFolders | None = None) -> str:
    """The real location of an indexed file, refused if it is no longer inside its folder's
    real location as recorded at indexing (or, without a record, its folder's current one)."""
    recorded = folders.recorded_real_folder(path) if folders is not None else None
    folder = recorded if recorded is not None else os.path.realpath(os.path.dirname(path))
    real = os.path.realpath(path)
    if not real.startswith(folder.rstrip(os.sep) + os.sep):
        raise FileRefused(403, "the indexed file now resolves outside the folder it was indexed in; not served")
    return real


def file_identity(path: str, folders: IndexedFolders | None = None) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns) of the file an indexed path leads to (after the folder check)."""
    try:
        st = os.stat(_locate(path, folders))
    except FileNotFoundError:
        raise FileRefused(404, "the indexed file no longer exists") from None
    except OSError as e:
        raise FileRefused(403, f"the indexed file cannot be read ({e.strerror})") from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_indexed_file(path: str, folders: IndexedFolders | None = None
                      ) -> tuple[bytes, str, tuple[int, int, int, int]]:
    """(bytes, media type, (device, inode, size, mtime_ns)) of an indexed image file, after the checks above."""
    real = _locate(path, folders)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise FileRefused(404, "the indexed file no longer exists") from None
    except OSError as e:
        raise FileRefused(403, f"the indexed file cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(403, "the indexed path is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise FileRefused(403, "the indexed file is too large to serve")
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt = img.format
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is not served
        fmt = None
    if fmt not in MEDIA_TYPES:
        raise FileRefused(403, "the indexed file is no longer an image")
    return data, MEDIA_TYPES[fmt], (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def make_thumbnail(data: bytes, size: int, quality: int = 85) -> bytes:
    """Image bytes -> JPEG bytes whose longer side is at most ``size``."""
    try:
        img = decode_untrusted(data, DecodeLimits(), min_size=size)
    except ValueError as e:
        raise FileRefused(422, f"the indexed file cannot be decoded: {e}") from None
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails kept in memory (least recently used dropped past ``max_bytes``), keyed by the
    file's identity, so a changed file gets a new thumbnail."""

    def __init__(self, size: int = 256, max_bytes: int = 64 * 1024 * 1024, folders: IndexedFolders | None = None):
        self.size = size
        self.folders = folders
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: str) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) for the indexed file at ``path``."""
        key = (path, *file_identity(path, self.folders))
        etag = '"' + hashlib.sha1(repr((key, self.size)).encode()).hexdigest()[:20] + '"'
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return cached, etag
        data, _, ident = read_indexed_file(path, self.folders)
        key = (path, *ident)  # as read, in case the file changed since the stat above
        thumb = make_thumbnail(data, self.size)
        with self._lock:
            self.misses += 1
            if key not in self._items:
                self._items[key] = thumb
                self._bytes += len(thumb)
            while self._bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return thumb, etag

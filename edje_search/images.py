"""Finding, reading and decoding images: a streaming folder walk and a DataLoader dataset.

Which files are images is decided here once (:func:`is_image_path`); build-index, add and sync
all ask it. Reading is defensive because a folder of photos can hold anything: only regular
files are opened (a FIFO, a device or a socket named ``x.jpg`` is skipped, never read), reads
are bounded, image headers are checked against the model's resize before any pixel is
decoded, and decoding has a time limit. A file that cannot be used yields a reason instead of
a tensor; the caller records it and carries on.

Torch is imported only by the loader functions, so the extension list costs no torch import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import logging
import math
import os
import signal
import stat
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from .photo_meta import header_fields, image_fields, path_fields

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# HEIC/HEIF (iPhone photos) decode through the optional pillow-heif plugin; the extensions
# count as images only where it is installed, so a build never lists files it cannot read.
HEIF_AVAILABLE = importlib.util.find_spec("pillow_heif") is not None
AVIF_AVAILABLE = importlib.util.find_spec("PIL._avif") is not None  # built into Pillow >= 11.3 wheels
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
    | ({".avif"} if AVIF_AVAILABLE else set())
    | ({".heic", ".heif"} if HEIF_AVAILABLE else set())
)

MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit, enforced as an error
MAX_FILE_BYTES = 256 * 1024 * 1024  # larger files are skipped unread
# Pixels of the intermediate image the model's "shortest side" resize makes before its centre
# crop: S x S*aspect. 16.7 Mpx (50 MB RGB) allows a 113:1 panorama at 384 px, 16384:1 at 32 px.
MAX_RESIZED_PIXELS = 1 << 24
DECODE_SECONDS = 60.0  # wall-clock limit for reading, decoding and transforming one file


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def describe_extensions() -> str:
    """The extension list as users read it in --help texts."""
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def iter_image_files(root: str | Path, follow_symlinks: bool = True) -> Iterator[Path]:
    """Yield image files under ``root`` (sorted per folder), streaming, never listing it all first.

    ``root`` itself may be a file: it is yielded when its name is an image name. Entries that
    are not regular files but carry an image name (a FIFO called ``pipe.jpg``, a link to a
    device) are yielded too, so the loader skips them with a reason the build reports.
    Symlink loops are broken by tracking visited directories' (device, inode), and a symlinked
    folder is entered only when it resolves inside ``root`` (a link to ``..`` or ``/`` would
    otherwise index whatever lies outside the folder asked for).
    """
    root = Path(root)
    if not root.is_dir():
        if is_image_path(root):
            yield root
        return
    real_root = root.resolve()
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    if entry.is_symlink() and not Path(entry.path).resolve().is_relative_to(real_root):
                        continue  # a link out of the folder being indexed
                    subdirs.append(Path(entry.path))
                elif is_image_path(entry.name):
                    yield Path(entry.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ reading
class Unusable(ValueError):
    """A file that cannot be indexed; the message is the reason users see."""


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _check_regular(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise Unusable(f"not a regular file ({kind})")
    if st.st_size > max_bytes:
        raise Unusable(f"file too large ({st.st_size:,} bytes; the limit is {max_bytes:,})")


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes, os.stat_result]:
    """Read a regular file of at most ``max_bytes``: (content, stat of exactly what was read).

    Symlinks are judged by their target. The kind of file is checked before opening and again
    on the opened descriptor (opened non-blocking, so even a FIFO swapped in between cannot
    block), and the read stops one byte past the limit. Raises :class:`Unusable`.
    """
    try:
        _check_regular(os.stat(path), max_bytes)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Unusable("broken symbolic link") from None
        raise Unusable("file no longer exists (deleted or moved during the build)") from None
    except OSError as e:
        raise Unusable(f"cannot read: {e.strerror or e}") from None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise Unusable("file no longer exists (deleted or moved during the build)") from None
    except OSError as e:
        raise Unusable(f"cannot open: {e.strerror or e}") from None
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)  # size and mtime of exactly the bytes we read
        _check_regular(st, max_bytes)
        data = f.read(st.st_size)  # never more than the limit, whatever the file does meanwhile
        changed = len(data) != st.st_size or f.read(1)
    if changed:
        raise Unusable("file changed while it was being read (still being written?)")
    return data, st


# ----------------------------------------------------------------------------------- decoding
_plugins_registered = False


def _register_plugins() -> None:
    """Teach PIL the optional formats (HEIC/HEIF) once per process."""
    global _plugins_registered
    if _plugins_registered:
        return
    _plugins_registered = True
    if HEIF_AVAILABLE:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
        except Exception as e:  # noqa: BLE001 - a broken optional plugin must not stop decoding other formats
            logger.warning("pillow-heif is installed but could not be registered: %s", e)


def check_dimensions(width: int, height: int, resize_to: int | None = None, resize_mode: str = "shortest",
                     max_pixels: int = MAX_PIXELS, max_resized_pixels: int = MAX_RESIZED_PIXELS) -> None:
    """Refuse (with :class:`Unusable`) sizes that would cost gigabytes before any pixel is decoded.

    ``resize_to`` is the model's input side S. Under ``resize_mode="shortest"`` the model first
    resizes the short side to S, making an S x S*(long/short) image that it then centre-crops:
    a 1x20000 strip at S = 384 would become 384 x 7,680,000 (8.8 GB). The other modes
    ("squash", "longest") never make an image larger than S x S.
    """
    if width <= 0 or height <= 0:
        raise Unusable(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise Unusable(f"image too large ({width}x{height} pixels; the limit is {max_pixels:,} pixels)")
    if resize_to and resize_mode == "shortest":
        short, long = min(width, height), max(width, height)
        resized_long = math.ceil(resize_to * long / short)
        if resize_to * resized_long > max_resized_pixels:
            raise Unusable(f"extreme aspect ratio ({width}x{height}): resizing its short side to {resize_to} px "
                           f"would make a {resize_to}x{resized_long} image")


def decode_image(data: bytes, min_size: int | None = None, *, resize_mode: str | None = None,
                 max_pixels: int = MAX_PIXELS, max_resized_pixels: int = MAX_RESIZED_PIXELS,
                 meta: dict | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image (first frame of animations, EXIF rotation applied).

    With ``min_size``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least ``min_size``: several times faster on camera photos, and the model
    resizes down to that size anyway. With ``resize_mode`` (the model's, with ``min_size`` as its
    input side) the header's size is checked by :func:`check_dimensions` before decoding.
    Raises ValueError (:class:`Unusable`) with a short reason for anything unusable. A ``meta``
    dict is filled with the pixel size and EXIF fields (photo_meta.image_fields) read from the
    header already parsed, before the EXIF rotation is applied.
    """
    if not data:
        raise Unusable("empty file")
    _register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            check_dimensions(img.width, img.height, min_size if resize_mode else None, resize_mode or "shortest",
                             max_pixels, max_resized_pixels)
            img.seek(0)
            if meta is not None:
                meta.update(image_fields(img))
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                background = Image.new("RGB", img.size, (255, 255, 255))
                background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
                return background
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v * (1 / 256)).convert("L")
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Unusable(f"not a readable image ({type(e).__name__})") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise Unusable(f"corrupt image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


class DecodeTimeout(Exception):
    """Raised by :func:`time_limit` when a file takes too long."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[bool]:
    """Raise :class:`DecodeTimeout` in this block after ``seconds`` of wall-clock time.

    Uses SIGALRM, so it works only in a process's main thread (DataLoader workers, the CLI) and
    only while nobody else holds the alarm (a test runner's timeout, another library): it then
    steps aside and the block runs unbounded (yields False); the size checks still hold.
    """
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield False
        return

    def on_alarm(signum, frame):
        raise DecodeTimeout(f"took longer than {seconds:g} s to read and decode")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield True
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)


def failure_reason(error: BaseException) -> str:
    """One short line saying why a file was skipped."""
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (Unusable, DecodeTimeout)):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """What one file may cost: bytes read, pixels decoded, pixels of the model's resize, seconds."""

    max_file_bytes: int = MAX_FILE_BYTES
    max_pixels: int = MAX_PIXELS
    max_resized_pixels: int = MAX_RESIZED_PIXELS
    seconds: float | None = DECODE_SECONDS


def decode_untrusted(data: bytes, limits: DecodeLimits = DecodeLimits(), min_size: int | None = None, *,
                     resize_mode: str | None = None, meta: dict | None = None) -> Image.Image:
    """The one guarded decode for bytes from outside (indexed files, uploads, thumbnails, score
    and classify inputs): at most ``limits.max_file_bytes`` bytes; the header's size checked
    against ``limits.max_pixels`` and, with ``resize_mode``, against the pixels of the model's
    resize to ``min_size`` before any pixel is decoded; first frame only; and a time limit where
    :func:`time_limit` can set one; ``meta`` as :func:`decode_image` fills it. Raises
    :class:`Unusable` or :class:`DecodeTimeout`."""
    if len(data) > limits.max_file_bytes:
        raise Unusable(f"file too large ({len(data):,} bytes; the limit is {limits.max_file_bytes:,})")
    with time_limit(limits.seconds):
        return decode_image(data, min_size, resize_mode=resize_mode, max_pixels=limits.max_pixels,
                            max_resized_pixels=limits.max_resized_pixels, meta=meta)


class ImageFileDataset:
    """Paths -> dicts with index, sha256 and a preprocessed tensor, or a skip reason (map-style
    dataset for a torch DataLoader). No file raises: every failure becomes a reason."""

    def __init__(self, paths: list[str], transform: Callable[[Image.Image], "torch.Tensor"],
                 known_hashes: frozenset[str] = frozenset(), min_size: int | None = None, *,
                 resize_mode: str | None = None, limits: DecodeLimits = DecodeLimits()):
        self.paths = paths
        self.transform = transform
        self.min_size = min_size  # the model's input side: JPEGs decode no larger than needed
        self.resize_mode = resize_mode  # the model's resize, for the size check before decoding
        self.known_hashes = known_hashes  # content already embedded: hash only, no decoding
        self.limits = limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return self.load(i, self.paths[i])

    def load(self, i: int, path: str) -> dict:
        """Item ``i`` from ``path``: the dict :meth:`__getitem__` returns (for feeds of paths)."""
        try:
            with time_limit(self.limits.seconds):
                return self._load(i, path)
        except Exception as e:  # noqa: BLE001 - any failure of one file (MemoryError included) skips that file
            return {"index": i, "sha256": None, "stat": None, "pixels": None, "error": failure_reason(e),
                    "duplicate": False, "meta": None}

    def _load(self, i: int, path: str) -> dict:
        data, st = read_image_file(path, self.limits.max_file_bytes)
        sha = file_sha256(data)
        stat_ = (st.st_size, st.st_mtime_ns)
        meta = path_fields(os.path.abspath(path))
        if sha in self.known_hashes:  # no decoding, but the header gives the metadata all the same
            meta.update(header_fields(data))
            return {"index": i, "sha256": sha, "stat": stat_, "pixels": None, "error": None, "duplicate": True,
                    "meta": meta}
        image = decode_untrusted(data, self.limits, self.min_size, resize_mode=self.resize_mode, meta=meta)
        del data
        pixels = self.transform(image)
        return {"index": i, "sha256": sha, "stat": stat_, "pixels": pixels, "error": None, "duplicate": False,
                "meta": meta}


def collate_images(items: list[dict]) -> dict:
    """Stack the good images; keep the failures aside with their reasons."""
    import torch

    good = [it for it in items if it["error"] is None and not it["duplicate"]]
    return {
        "duplicates": [(it["index"], it["sha256"], it["stat"]) for it in items if it["duplicate"]],
        "index": [it["index"] for it in good],
        "sha256": [it["sha256"] for it in good],
        "stat": [it["stat"] for it in good],
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "failed": [(it["index"], it["error"]) for it in items if it["error"] is not None],
        "meta": {it["index"]: it.get("meta") for it in items if it["error"] is None},  # good and duplicates
    }


def image_loader(paths: list[str], transform, batch_size: int, num_workers: int,
                 known_hashes: frozenset[str] = frozenset(), min_size: int | None = None, *,
                 resize_mode: str | None = None, limits: DecodeLimits = DecodeLimits()
                 ) -> "torch.utils.data.DataLoader":
    import torch

    dataset = ImageFileDataset(paths, transform, known_hashes, min_size, resize_mode=resize_mode, limits=limits)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images, shuffle=False,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )

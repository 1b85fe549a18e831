"""Finding and decoding images: a streaming folder walk and a DataLoader dataset.

Decoding happens in DataLoader workers, in parallel with the model. A file that cannot be
used yields a reason instead of a tensor; the caller records it and carries on.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit, enforced as an error


def iter_image_files(root: str | Path, follow_symlinks: bool = True) -> Iterator[Path]:
    """Yield image files under ``root`` (sorted per folder), streaming, never listing it all first.

    Symlink loops are broken by tracking visited directories' (device, inode).
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
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
                    subdirs.append(Path(entry.path))
                elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield Path(entry.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image (first frame of animations, EXIF rotation applied).

    With ``min_size``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least ``min_size``: several times faster on camera photos, and the model
    resizes down to that size anyway. Raises ValueError with a short reason for anything unusable.
    """
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"image too large ({img.width}x{img.height} pixels)")
            img.seek(0)
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
        raise ValueError(f"not a readable image ({type(e).__name__})") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"corrupt image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


class ImageFileDataset(torch.utils.data.Dataset):
    """Paths -> dicts with index, sha256 and a preprocessed tensor, or a skip reason."""

    def __init__(self, paths: list[str], transform: Callable[[Image.Image], torch.Tensor],
                 known_hashes: frozenset[str] = frozenset(), min_size: int | None = None):
        self.paths = paths
        self.transform = transform
        self.min_size = min_size  # decode JPEGs no larger than needed for this input size
        self.known_hashes = known_hashes  # content already embedded: hash only, no decoding

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # size and mtime of exactly the bytes we read
                data = f.read()
            sha = file_sha256(data)
            stat = (st.st_size, st.st_mtime_ns)
            if sha in self.known_hashes:
                return {"index": i, "sha256": sha, "stat": stat, "pixels": None, "error": None, "duplicate": True}
            pixels = self.transform(decode_image(data, self.min_size))
            return {"index": i, "sha256": sha, "stat": stat, "pixels": pixels, "error": None, "duplicate": False}
        except (OSError, ValueError) as e:
            return {"index": i, "sha256": None, "pixels": None, "error": str(e) or type(e).__name__,
                    "duplicate": False}


def collate_images(items: list[dict]) -> dict:
    """Stack the good images; keep the failures aside with their reasons."""
    good = [it for it in items if it["error"] is None and not it["duplicate"]]
    return {
        "duplicates": [(it["index"], it["sha256"], it["stat"]) for it in items if it["duplicate"]],
        "index": [it["index"] for it in good],
        "sha256": [it["sha256"] for it in good],
        "stat": [it["stat"] for it in good],
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "failed": [(it["index"], it["error"]) for it in items if it["error"] is not None],
    }


def image_loader(paths: list[str], transform, batch_size: int, num_workers: int,
                 known_hashes: frozenset[str] = frozenset(), min_size: int | None = None
                 ) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageFileDataset(paths, transform, known_hashes, min_size), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate_images, shuffle=False,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )

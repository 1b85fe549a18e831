"""Readers for image-caption annotations.

Formats (BLIP/ALBEF style):

* training JSON: a list of ``{"image": rel_path, "caption": str, "image_id": any}``;
* evaluation JSON: a list of ``{"image": rel_path, "caption": [str, ...]}``;
* JSON Lines: one ``{"image": rel_path, "caption": str or [str, ...]}`` per line.

Paths are relative to an image root. Bad entries (missing image, unreadable file, empty
caption, malformed record) are collected in ``problems`` with a reason, never dropped silently.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError


@dataclasses.dataclass
class CaptionSet:
    """Images with their captions; ``caption_image[j]`` is the image index of caption j."""

    images: list[Path]
    captions: list[str]
    caption_image: list[int]
    image_ids: list[str]
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (where, reason)

    @property
    def image_captions(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for j, i in enumerate(self.caption_image):
            out[i].append(j)
        return out


def _load_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append(ValueError(f"line {n}: invalid JSON ({e.msg})"))
        return records
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries")
    return data


def _check_image(path: Path) -> str | None:
    if not path.is_file():
        return "image file missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"unreadable image ({type(e).__name__})"
    return None


def read_captions(annotation_file: str | Path, image_root: str | Path | None = None,
                  *, check_images: bool = True) -> CaptionSet:
    """Read any supported annotation file; entries of the same image are merged.

    ``image_root`` defaults to the annotation file's folder.
    """
    annotation_file = Path(annotation_file)
    root = Path(image_root) if image_root is not None else annotation_file.parent
    out = CaptionSet([], [], [], [])
    index: dict[str, int] = {}
    verdict: dict[str, str | None] = {}
    for n, rec in enumerate(_load_records(annotation_file)):
        where = f"{annotation_file.name}[{n}]"
        if isinstance(rec, Exception):
            out.problems.append((where, str(rec)))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            out.problems.append((where, "entry has no 'image' path"))
            continue
        caps = rec.get("caption")
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            out.problems.append((where, "caption must be a string or a list of strings"))
            continue
        caps = [c.strip() for c in caps]
        if not caps or not all(caps):
            out.problems.append((where, "empty caption"))
            caps = [c for c in caps if c]
            if not caps:
                continue
        rel = rec["image"]
        if rel not in verdict:
            verdict[rel] = _check_image(root / rel) if check_images else None
        if verdict[rel] is not None:
            out.problems.append((f"{where} ({rel})", verdict[rel]))
            continue
        if rel not in index:
            index[rel] = len(out.images)
            out.images.append(root / rel)
            out.image_ids.append(str(rec.get("image_id", rel)))
        for c in caps:
            out.captions.append(c)
            out.caption_image.append(index[rel])
    return out

"""What identifies a saved model, readable without torch: ``edje.json`` and the weights' fingerprint.

Commands that need no model (``info``, ``verify``) read these without importing torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

BUNDLE_FILE = "edje.json"


@dataclasses.dataclass(frozen=True)
class BundleInfo:
    """``edje.json``. Ranking score of a reranked hit = joint-encoder logit + ``fusion_weight`` x
    first-stage similarity (ALBEF and BLIP add their contrastive similarity to the matching score
    the same way); 0 ranks by the joint encoder alone, as the EDJE paper does. ``edje-search
    calibrate`` picks the weight on a validation split. Not part of the fingerprint: it changes
    no stored row."""

    name: str
    format_version: int = 1
    fusion_weight: float = 0.0
    fingerprint: str = ""  # tensor_fingerprint() of the weights, computed once when they are saved


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def tensor_fingerprint(directory: str | Path) -> str:
    """Hash of every tensor's name, dtype, shape and bytes in the model's ``*.safetensors`` files.

    Independent of file metadata and of the order tensors were written in, so re-saving identical
    weights keeps it; reads the files directly (no torch), so ``verify`` can check it cheaply.
    """
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors"), key=lambda p: p.relative_to(directory).as_posix()):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            base = 8 + n
            for name in sorted(k for k in header if k != "__metadata__"):
                t = header[name]
                h.update(f"{name}|{t['dtype']}|{t['shape']}|".encode())
                start, end = t["data_offsets"]
                f.seek(base + start)
                remaining = end - start
                while remaining:
                    block = f.read(min(remaining, 1 << 22))
                    if not block:
                        raise ValueError(f"{path}: truncated tensor {name}")
                    h.update(block)
                    remaining -= len(block)
    return h.hexdigest()[:16]


def read_bundle_info(directory: str | Path) -> BundleInfo:
    """``edje.json`` of a model directory, without loading the model (no torch needed)."""
    return BundleInfo(**json.loads((Path(directory) / BUNDLE_FILE).read_text()))

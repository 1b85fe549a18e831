"""What identifies a saved model, readable without torch: ``edje.json`` and the weights' fingerprint.

Commands that need no model (``info``, ``verify``) read these without importing torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..errors import ModelDamaged

BUNDLE_FILE = "edje.json"
# Weight files up to this size are hashed whole each time the model is opened (well under a
# second); larger ones are checked by size and a sampled hash, and fully by `verify`.
FULL_CHECK_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 4096


@dataclasses.dataclass(frozen=True)
class BundleInfo:
    """``edje.json``. Ranking score of a reranked hit = joint-encoder logit + ``fusion_weight`` x
    first-stage similarity (ALBEF and BLIP add their contrastive similarity to the matching score
    the same way); 0 ranks by the joint encoder alone, as the EDJE paper does. ``edje-search
    calibrate`` picks the weight on a validation split, and fits ``calibration`` there: the Platt
    scaling of the joint encoder's logit into a match probability (calibration.Calibration as a
    dict; None = uncalibrated, prob = sigmoid(logit)). Neither is part of the fingerprint: they
    change no stored row."""

    name: str
    format_version: int = 1
    fusion_weight: float = 0.0
    calibration: dict | None = None
    fingerprint: str = ""  # tensor_fingerprint() of the weights, computed once when they are saved
    # weight file (relative path) -> {"size", "sampled" hash, "sha256" when small}: checked at open
    files: dict = dataclasses.field(default_factory=dict)


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


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.safetensors"), key=lambda p: p.relative_to(directory).as_posix())


def _sampled_hash(path: Path, size: int) -> str:
    """SHA-256 of SAMPLE_BLOCKS blocks spread evenly over the file (its header included)."""
    h = hashlib.sha256()
    step = max((size - SAMPLE_BLOCK_BYTES) // max(SAMPLE_BLOCKS - 1, 1), 1)
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(min(i * step, max(size - SAMPLE_BLOCK_BYTES, 0)))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weight_file_records(directory: str | Path) -> dict:
    """What :func:`check_weights` compares at open, recorded in ``edje.json`` when weights are saved."""
    directory = Path(directory)
    out = {}
    for path in _weight_files(directory):
        size = path.stat().st_size
        rec = {"size": size, "sampled": _sampled_hash(path, size)}
        if size <= FULL_CHECK_BYTES:
            rec["sha256"] = _file_sha256(path)
        out[path.relative_to(directory).as_posix()] = rec
    return out


def _check_header(path: Path) -> None:
    """The safetensors header parses and the file is as long as its tensors say."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelDamaged(f"model weights file {path} is unreadable ({e}): restore it or save the model again") \
            from e
    if 8 + n + end != size:
        raise ModelDamaged(f"model weights file {path} is {size} bytes, its header needs {8 + n + end} "
                           f"(truncated or overwritten)")


def check_weights(directory: str | Path, info: BundleInfo) -> None:
    """Refuse damaged weights before they are loaded; raises ModelDamaged naming the file.

    Every weight file recorded in ``edje.json`` must exist with its recorded size and content
    (the whole file's SHA-256 for files up to FULL_CHECK_BYTES, a sampled hash for larger ones);
    models saved before these records get the header and length check alone."""
    directory = Path(directory)
    for rel, rec in sorted(info.files.items()):
        path = directory / rel
        if not path.is_file():
            raise ModelDamaged(f"model weights file missing: {path}")
        size = path.stat().st_size
        if size != rec["size"]:
            raise ModelDamaged(f"model weights file {path} is {size} bytes, {rec['size']} when it was saved "
                               f"(truncated or replaced)")
        same = _file_sha256(path) == rec["sha256"] if "sha256" in rec else _sampled_hash(path, size) == rec["sampled"]
        if not same:
            raise ModelDamaged(f"model weights file {path} has changed since it was saved (checksum mismatch): "
                               f"restore it or save the model again")
    for path in _weight_files(directory):
        _check_header(path)

"""Scoring and filtering webdataset shards (img2dataset's layout: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``).

A sample's caption is its ``.txt`` member; it is named ``SHARD.tar#MEMBER`` (the image member), as
index builds name it. :func:`write_kept_shards` writes, per input shard, a shard holding only the
kept samples: every member of a kept sample (image, caption, metadata, anything else) is copied
with its header fields and its bytes unchanged, in the original order.
"""
from __future__ import annotations

import dataclasses
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .distributed.sources import SHARD_SEPARATOR, _split_member, iter_shard
from .errors import BadInput
from .fsutil import atomic_write
from .images import decode_image, failure_reason
from .models.bundle import EdjeModel
from .pipeline import embed_pixels
from .scoring import BadEntry, Pair, joint_and_cosine, records


def shard_pairs(shards: Iterable[str]) -> Iterator[Pair | BadEntry]:
    """(caption, image) pairs of the samples of ``shards``, in shard order; the image bytes travel
    with the pair (``Pair.data``). Samples without an image or a caption are bad entries."""
    position = 0
    for shard in shards:
        for sample in iter_shard(shard):
            caption = str(sample.meta.get("caption") or "").strip()
            if sample.error or not caption:
                yield BadEntry(position, sample.path, sample.error or "sample has no caption (KEY.txt)")
            else:
                yield Pair(position, sample.path, caption, sample.path, data=sample.data)
            position += 1


class ShardScorer:
    """Scores pairs whose images are bytes from shards: decoded here, then the vision tower.

    Decoding runs in this process: shard members arrive in one sequential tar stream, which the
    DataLoader workers of FileScorer (one file per item) cannot share.
    """

    def __init__(self, model: EdjeModel, *, batch_size: int = 32, cosine: bool = True):
        self.model = model
        self.batch_size = batch_size
        self.cosine = cosine
        cfg = model.first_stage.config
        self._decode = lambda data: model.first_stage.preprocess(
            decode_image(data, cfg.image_size, resize_mode=cfg.resize_mode))

    def score(self, pairs: list[Pair]) -> tuple[list[dict], list[BadEntry]]:
        pixels, good, bad = [], [], []
        for p in pairs:
            try:
                pixels.append(self._decode(p.data))
                good.append(p)
            except Exception as e:  # noqa: BLE001 - any failure of one image skips that sample
                bad.append(BadEntry(p.position, p.image, failure_reason(e)))
        if not good:
            return [], bad
        vectors, tokens = [], []
        for s in range(0, len(good), self.batch_size):
            v, t = embed_pixels(self.model, torch.stack(pixels[s:s + self.batch_size]), token_dtype="float32")
            vectors.append(v)
            tokens.append(t)
        logits, cosines = joint_and_cosine(self.model, [p.caption for p in good], np.concatenate(vectors),
                                           torch.from_numpy(np.concatenate(tokens)), np.arange(len(good)),
                                           batch_size=self.batch_size, cosine=self.cosine)
        return records(self.model, good, logits, cosines), bad

    def close(self) -> None:
        pass


def sample_key(image: str) -> tuple[str, str]:
    """``SHARD.tar#dir/000123.jpg`` -> (shard path, sample key ``dir/000123``)."""
    shard, sep, member = image.rpartition(SHARD_SEPARATOR)
    if not sep:
        raise BadInput(f"{image!r} does not name a shard member (SHARD.tar{SHARD_SEPARATOR}MEMBER)")
    return shard, _split_member(member)[0]


@dataclasses.dataclass
class ShardFilterReport:
    shards: int = 0
    samples_kept: int = 0
    members_copied: int = 0


def write_kept_shards(shards: Iterable[str], kept_images: Iterable[str], out_dir: str | Path) -> ShardFilterReport:
    """Write ``out_dir/NAME.tar`` for each input shard, holding only the samples named in
    ``kept_images`` (``SHARD.tar#MEMBER`` paths, as the score records give them). Each shard is
    written atomically, so an interrupted pass leaves whole shards; re-running it rewrites them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept: dict[str, set[str]] = {}
    for image in kept_images:
        shard, key = sample_key(image)
        kept.setdefault(os.path.abspath(shard), set()).add(key)
    report = ShardFilterReport()
    names = set()
    for shard in shards:
        name = Path(shard).name
        if name in names:
            raise BadInput(f"two input shards are named {name}: their filtered copies would collide in {out_dir}")
        names.add(name)
        keys = kept.get(os.path.abspath(shard), set())

        def copy(tmp: Path, shard=shard, keys=keys) -> None:
            with tarfile.open(shard, mode="r|*") as src, tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as dst:
                seen = set()
                for member in src:
                    key = _split_member(member.name)[0]
                    if key not in keys:
                        continue
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
                    report.members_copied += 1
                    seen.add(key)
                report.samples_kept += len(seen)

        atomic_write(out_dir / name, copy)
        report.shards += 1
    return report

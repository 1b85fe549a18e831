"""The work a distributed build hands to the cluster: decode tasks (CPU) and embedding actors.

Plain functions and one class; Ray calls them through ``Dataset.map_batches`` (build.py), and
nothing here imports Ray, so they run and are tested in one process too. Batches are dicts of
numpy arrays (Ray Data's "numpy" format); a row that cannot be used keeps its reason in
``error`` and zeros in its array columns, so failures travel with the data and get reported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable, Iterator

import numpy as np

from ..images import DecodeLimits, ImageFileDataset, decode_untrusted, failure_reason, file_sha256, time_limit
from .sources import iter_shard

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What a decode task needs to know about the model's input (sent to every task, no weights)."""

    transform: Callable  # the first stage's preprocess: PIL image -> (3, S, S) float tensor
    image_size: int
    resize_mode: str
    limits: DecodeLimits = DecodeLimits()

    @classmethod
    def for_model(cls, model) -> "DecodeSpec":
        config = model.first_stage.config
        return cls(model.first_stage.preprocess, config.image_size, config.resize_mode)


def _rows(spec: DecodeSpec, paths: list[str], shas: list[str], pixels: list, errors: list[str],
          metas: list[str], stats: list | None = None) -> dict[str, np.ndarray]:
    stats = [st or (-1, -1) for st in stats] if stats else [(-1, -1)] * len(paths)
    blank = np.zeros((3, spec.image_size, spec.image_size), np.float32)
    return {
        "path": np.array(paths, dtype=object),
        "sha256": np.array(shas, dtype=object),
        "meta": np.array(metas, dtype=object),  # JSON text ("" for none): dicts of any keys travel as text
        "error": np.array(errors, dtype=object),
        # (size, mtime_ns) of exactly the bytes read, so later builds notice a changed file; -1 for shard samples
        "size": np.array([st[0] for st in stats], dtype=np.int64),
        "mtime_ns": np.array([st[1] for st in stats], dtype=np.int64),
        "pixels": np.stack([blank if p is None else np.asarray(p, np.float32) for p in pixels]) if paths
        else np.zeros((0, 3, spec.image_size, spec.image_size), np.float32),
    }


def decode_files(batch: dict[str, np.ndarray], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Rows {path} -> rows {path, sha256, meta, error, pixels (3, S, S)}; the same reading and decoding
    rules (and limits) as the single-process build (images.ImageFileDataset)."""
    dataset = ImageFileDataset([], spec.transform, min_size=spec.image_size, resize_mode=spec.resize_mode,
                               limits=spec.limits)
    paths = [str(p) for p in batch["path"]]
    items = [dataset.load(i, p) for i, p in enumerate(paths)]
    return _rows(spec, paths, [it["sha256"] or "" for it in items], [it["pixels"] for it in items],
                 [it["error"] or "" for it in items],
                 [json.dumps(it["meta"], ensure_ascii=False) if it.get("meta") else "" for it in items],
                 [it["stat"] for it in items])


def decode_bytes(data: bytes, spec: DecodeSpec, meta: dict | None = None):
    """Image bytes -> preprocessed (3, S, S) tensor; raises like the file path does. ``meta`` is
    filled with the pixel size and EXIF fields (photo_meta.image_fields)."""
    with time_limit(spec.limits.seconds):
        image = decode_untrusted(data, spec.limits, spec.image_size, resize_mode=spec.resize_mode, meta=meta)
        return spec.transform(image)



def decode_shards(batch: dict[str, np.ndarray], spec: DecodeSpec, rows_per_batch: int = 64
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Rows {shard, done} -> batches of decoded samples (streamed: a shard never sits in memory
    whole). ``done`` holds the sample paths of that shard already indexed (a resumed build)."""
    for shard, done in zip(batch["shard"], batch["done"]):
        done = set(json.loads(done))
        out: list[tuple[str, str, object, str, str]] = []
        for sample in iter_shard(str(shard), spec.limits.max_file_bytes):
            if sample.path in done:
                continue
            sha, pixels, error, image_meta = "", None, sample.error, {}
            if not error:
                sha = file_sha256(sample.data)
                try:
                    pixels = decode_bytes(sample.data, spec, image_meta)
                except Exception as e:  # noqa: BLE001 - any failure of one sample skips that sample
                    error = failure_reason(e)
            meta = {**image_meta, **(sample.meta or {})}  # the shard's own .json/.txt fields win
            out.append((sample.path, sha, pixels, error, json.dumps(meta, ensure_ascii=False) if meta else ""))
            if len(out) >= rows_per_batch:
                yield _rows(spec, *map(list, zip(*out)))
                out = []
        if out:
            yield _rows(spec, *map(list, zip(*out)))


class EmbedWorker:
    """One model copy (per GPU, or per CPU actor): decoded rows -> vectors and stored tokens.

    Loads the model directory the index was built with and checks its fingerprint, so every
    actor embeds with exactly the index's model. ``threads``: torch CPU threads of this actor.
    """

    def __init__(self, model_dir: str, fingerprint: str, *, device: str = "auto", precision: str = "auto",
                 token_dtype: str = "float16", threads: int = 1):
        import torch

        from ..devices import pick_device
        from ..errors import ModelMismatch
        from ..models.bundle import EdjeModel

        torch.set_num_threads(max(1, threads))
        self.model = EdjeModel.from_pretrained(model_dir)
        if self.model.fingerprint() != fingerprint:
            raise ModelMismatch(f"the model at {model_dir} is {self.model.fingerprint()} on this node, "
                                f"but the index was built with {fingerprint}")
        self.model.to(pick_device(device)).eval()
        self.precision = precision
        self.token_dtype = token_dtype
        logger.info("embedding worker ready on %s", self.model.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ..pipeline import embed_pixels

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        n = len(ok)
        cfg = self.model.reranker.config
        vectors = np.zeros((n, self.model.first_stage.embed_dim), np.float32)
        tokens = np.zeros((n, cfg.tokens_per_image, self.model.reranker.token_width), self.token_dtype)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            vectors[ok], tokens[ok] = embed_pixels(self.model, pixels, precision=self.precision,
                                                   token_dtype=self.token_dtype)
        return {"path": batch["path"], "sha256": batch["sha256"], "meta": batch["meta"], "error": batch["error"],
                "size": batch["size"], "mtime_ns": batch["mtime_ns"], "vector": vectors, "tokens": tokens}

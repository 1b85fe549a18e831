"""build-index throughput against the raw vision-encoder throughput: what the pipeline costs.

The collection is JPEG photos-sized images (640 x 480) written to a temporary folder; the
model is the demo architecture (48 px ViT, 12 stored tokens) before training; speed does not depend on weights.
"""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edje_search.engine import Engine
from edje_search.models.bundle import EdjeModel
from edje_search.training.first_stage import FirstStageTrainConfig, demo_first_stage
from edje_search.training.reranker import RerankerTrainConfig, new_reranker

from .timing import median_seconds


def photo(path: str, seed: int, size=(640, 480)) -> None:
    """One photo-sized JPEG: a random colour gradient with noise (quality 90)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    c = rng.uniform(0, 255, (3, 3))
    img = np.stack([(c[k, 0] + c[k, 1] * xx / size[0] + c[k, 2] * yy / size[1]) % 256 for k in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def _photo(args: tuple[str, int]) -> None:
    photo(*args)


def write_photos(directory: Path, n: int, workers: int = 1) -> Path:
    """``n`` photos 00000.jpg... in ``directory``, written by ``workers`` processes."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(str(directory / f"{i:05d}.jpg"), i) for i in range(n)]
    if workers <= 1:
        for job in jobs:
            _photo(job)
    else:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            pool.map(_photo, jobs, chunksize=16)
    return directory


def demo_shaped_model() -> EdjeModel:
    cfg = RerankerTrainConfig(n_queries=12, mlp_dim=512)  # the demo's reranker shape
    first = demo_first_stage(FirstStageTrainConfig())
    return EdjeModel(first, new_reranker(first, cfg), name="bench-demo-shape").eval()


def build_throughput(workdir: Path, n_images: int, batch_size: int = 32, workers: int = 2) -> dict:
    photos = write_photos(workdir / "photos", n_images)
    model = demo_shaped_model()
    pixels = torch.randn(batch_size, 3, model.first_stage.config.image_size, model.first_stage.config.image_size)

    def encode():
        with torch.inference_mode():
            model.embed_images(pixels)
    raw = batch_size / median_seconds(encode, warmup=2, repeats=5)
    model.save_pretrained(workdir / "model")
    model = EdjeModel.from_pretrained(workdir / "model")
    engine = Engine.create(workdir / "index", model)
    t = time.perf_counter()
    report = engine.sync(photos, batch_size=batch_size, num_workers=workers, progress=False)
    built = report.added / (time.perf_counter() - t)
    return {"images": n_images, "image_size": list(Image.open(next(photos.iterdir())).size),
            "raw_encoder_images_per_s": raw, "build_index_images_per_s": built,
            "build/raw": built / raw, "workers": workers, "batch_size": batch_size}

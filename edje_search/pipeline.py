"""Indexing pipeline stage: image files -> (first-stage vectors, stored tokens).

Hand-off: :class:`ImageEmbedder` (or the one-shot :func:`embed_files`) yields
:class:`EmbeddedBatch` objects; the engine commits them to its index store, and
:class:`BackgroundCommits` lets it do so on a writer thread while the next batches are embedded.
Decoding runs in DataLoader workers that live as long as the embedder, so a build processed in
chunks starts its decode workers once. On CUDA, batches are pinned and copied without blocking,
and the model runs under autocast (bf16 where supported, else fp16; see devices.py).
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .devices import precision_autocast, to_device
from .images import ImageFileDataset, collate_images, image_loader
from .models.bundle import EdjeModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_image_files(first_stage, paths: list, *, batch_size: int = 64, num_workers: int = 1,
                       progress: bool = True, desc: str = "encoding images") -> tuple[torch.Tensor, torch.Tensor]:
    """First-stage pass over image files that must all be readable (training and evaluation sets).

    Returns (normalised embeddings (N, E) float32, vision tokens (N, n, D_v) float16), on CPU.
    """
    device = next(first_stage.parameters()).device
    embs, toks = [], []
    loader = image_loader([str(p) for p in paths], first_stage.preprocess, batch_size, num_workers,
                          min_size=first_stage.config.image_size, resize_mode=first_stage.config.resize_mode)
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        if batch["failed"]:
            index, reason = batch["failed"][0]
            raise ValueError(f"unreadable image: {paths[index]}: {reason}")
        e, t = first_stage.encode_image(to_device(batch["pixels"], device))
        embs.append(e.float().cpu())
        toks.append(t.half().cpu())
    return torch.cat(embs), torch.cat(toks)


def embed_pixels(model: EdjeModel, pixels: torch.Tensor, *, precision: str = "auto",
                 token_dtype: str = "float16") -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, H, W) preprocessed images -> (vectors (B, E) float32 L2-normalised, tokens (B, m, d)).

    The one embedding step of every build (single process and Ray actors): the batch goes to
    the model's device (pinned, non-blocking on CUDA) and runs under that device's autocast.
    """
    device = model.device
    with torch.inference_mode(), precision_autocast(device, precision):
        vectors, tokens = model.embed_images(to_device(pixels, device))
    vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)  # re-normalise after low precision
    return vectors.cpu().numpy(), tokens.float().cpu().numpy().astype(token_dtype)


@dataclasses.dataclass
class EmbeddedBatch:
    paths: list[str]
    hashes: list[str]
    vectors: np.ndarray  # (b, E) float32, L2-normalised
    tokens: np.ndarray  # (b, m, d) in the store's dtype
    failed: list[tuple[str, str]]  # (path, reason)
    # (path, sha256, (size, mtime_ns)) of files whose content is already embedded
    duplicates: list[tuple[str, str, tuple[int, int]]] = dataclasses.field(default_factory=list)
    stats: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (size, mtime_ns) as read, per path
    # path -> metadata read while decoding (photo_meta.py), for paths and duplicates alike
    meta: dict[str, dict] = dataclasses.field(default_factory=dict)


class _Feed(torch.utils.data.Sampler):
    """The items of the current pass: (position, path) pairs, replaced before each pass."""

    def __init__(self):
        self.items: list[tuple[int, str]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _FedDataset(ImageFileDataset):
    """An :class:`ImageFileDataset` whose items arrive with their path (from :class:`_Feed`), so
    one set of worker processes serves every pass."""

    def __getitem__(self, item: tuple[int, str]) -> dict:
        return self.load(*item)


class ImageEmbedder:
    """Decode workers and the model, kept for a whole build: call :meth:`embed` once per chunk.

    ``known_hashes`` (any container answering ``sha in known``): files with that content come
    back as duplicates without decoding. ``precision``: auto, fp32, bf16 or fp16 (devices.py).
    """

    def __init__(self, model: EdjeModel, *, batch_size: int = 32, num_workers: int = 2,
                 token_dtype: str = "float16", precision: str = "auto", known_hashes=frozenset()):
        self.model = model
        self.batch_size = batch_size
        self.token_dtype = token_dtype
        self.precision = precision
        config = model.first_stage.config
        self._feed = _Feed()
        dataset = _FedDataset([], model.first_stage.preprocess, known_hashes, config.image_size,
                              resize_mode=config.resize_mode)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self._feed, num_workers=num_workers,
            collate_fn=collate_images, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, pin_memory=model.device.type == "cuda",
        )

    def embed(self, paths: list[str], *, progress: bool = True) -> Iterator[EmbeddedBatch]:
        """Decode and embed ``paths`` in order; unreadable files come back in ``failed`` with a reason,
        files whose content is known come back in ``duplicates`` without running the model."""
        model = self.model
        self._feed.items = list(enumerate(paths))
        bar = tqdm(total=len(paths), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)
        try:
            for batch in self._loader:
                failed = [(paths[i], reason) for i, reason in batch["failed"]]
                dups = [(paths[i], sha, stat) for i, sha, stat in batch["duplicates"]]
                meta = {paths[i]: m for i, m in batch.get("meta", {}).items() if m}
                if batch["pixels"] is None:
                    yield EmbeddedBatch([], [], np.zeros((0, model.first_stage.embed_dim), np.float32),
                                        np.zeros((0, model.reranker.config.tokens_per_image,
                                                  model.reranker.token_width), self.token_dtype), failed, dups,
                                        meta=meta)
                else:
                    vectors, tokens = embed_pixels(model, batch["pixels"], precision=self.precision,
                                                   token_dtype=self.token_dtype)
                    yield EmbeddedBatch([paths[i] for i in batch["index"]], batch["sha256"], vectors, tokens,
                                        failed, dups, batch["stat"], meta)
                bar.update(len(batch["index"]) + len(failed) + len(dups))
        finally:
            bar.close()

    def close(self) -> None:
        """Stop the decode workers (they also stop when the embedder is garbage-collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def __enter__(self) -> "ImageEmbedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def embed_files(model: EdjeModel, paths: list[str], *, batch_size: int = 32, num_workers: int = 2,
                token_dtype: str = "float16", progress: bool = True, known_hashes=frozenset(),
                precision: str = "auto") -> Iterator[EmbeddedBatch]:
    """One pass of a fresh :class:`ImageEmbedder` over ``paths`` (see :meth:`ImageEmbedder.embed`)."""
    with ImageEmbedder(model, batch_size=batch_size, num_workers=num_workers, token_dtype=token_dtype,
                       precision=precision, known_hashes=known_hashes) as embedder:
        yield from embedder.embed(paths, progress=progress)


class BackgroundCommits:
    """Runs commit calls on one writer thread, in order, so the model never waits on the disk.

    ``submit(fn, *args)`` queues a call (blocking once ``depth`` calls wait, which bounds the
    memory held by pending batches); ``wait()`` returns the results in submission order and
    re-raises the first exception a call raised. Use as a context manager.
    """

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._results: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="edje-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, kwargs = item
            if self._error is None:  # after a failure, later commits are dropped, not run
                try:
                    self._results.append(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - handed to the caller by wait()/submit()
                    self._error = e

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((fn, args, kwargs))

    def wait(self) -> list:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._results

    def __enter__(self) -> "BackgroundCommits":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
        elif self._thread.is_alive():  # the caller failed: finish what was queued, then stop
            self._queue.put(None)
            self._thread.join()


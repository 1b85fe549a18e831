"""`edje-search build-index SOURCE --ray [ADDRESS]`: build an index with Ray Data.

Data flow (clip-retrieval's reader -> mapper -> writer, on Ray)::

    source rows (paths, or shards)  --map_batches, CPU tasks-->  decoded pixels
      --map_batches, actor pool (one model copy per actor / GPU)-->  vectors + tokens
      --iter_batches on the driver-->  Engine.add_embeddings, on a writer thread, commit_every rows

Only the driver writes the index (it holds the writer lock for each commit); the cluster only
reads images and the model directory, which must therefore be at the same path on every node
(a shared filesystem). Ray restarts an actor that dies (``max_restarts``) and retries its
batches (``max_task_retries``), so a lost worker costs time, not rows; if the driver dies, the
committed rows stay and the next run skips them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadInput, EdjeError
from ..indexer import BuildReport, changed_or_gone
from ..pipeline import BackgroundCommits
from ..storage.token_store import working_dtype
from .sources import SHARD_SEPARATOR, Source, resolve_source
from .workers import DecodeSpec, EmbedWorker, decode_files, decode_shards

logger = logging.getLogger(__name__)

LOOKUP_CHUNK = 10_000  # paths per manifest look-up while filtering what is already indexed


def import_ray():
    """Ray, or a clear error saying how to install it (Ray is an optional dependency)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise EdjeError("the Ray build needs Ray Data: pip install 'edje-search[ray]'") from e
    return ray


def ray_build_index(engine, source: str | os.PathLike, *, address: str | None = None, actors: int | None = None,
                    device: str = "auto", precision: str = "auto", batch_size: int = 32, decode_batch: int = 64,
                    commit_every: int = 1024, actor_cpus: float = 1.0, progress: bool = True,
                    on_batch: Callable[[int], None] | None = None):
    """Embed every new image of ``source`` on a Ray cluster and commit it into ``engine``'s index.

    ``source``: a folder, a file list or webdataset shards (see sources.py). ``address``: the
    cluster to join ("auto", "HOST:PORT"; None starts a local one unless Ray is already
    initialised in this process). ``actors``: model copies (default: one per GPU of the cluster,
    else 1). ``device``: "auto" (cuda when the cluster has GPUs), "cuda" or "cpu"; on CUDA each
    actor takes one GPU and runs under autocast (``precision``). ``batch_size``: images per
    model forward pass (choose by GPU memory). ``commit_every``: rows per index commit.
    ``on_batch(rows_received)`` is called on the driver as results arrive (progress, tests).

    For a folder, files that are gone since the last build are dropped, as ``Engine.sync``
    does; files whose size or modification time changed are dropped and embedded again.
    Returns the BuildReport (added, unchanged, removed, skipped with reasons).
    """
    if batch_size <= 0 or decode_batch <= 0 or commit_every <= 0:
        raise BadInput("batch_size, decode_batch and commit_every must be positive")
    ray = import_ray()
    src = resolve_source(source)
    indexer = engine.indexer
    model = indexer.model
    if model.path is None:
        raise BadInput("the Ray build needs a saved model directory (the index's model)")
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    report = BuildReport()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.print_on_execution_start = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        if device.startswith("cuda") and not gpus:
            raise BadInput("device cuda asked for, but the Ray cluster has no GPUs")
        actors = actors or (gpus if device.startswith("cuda") else 1)
        removed = _drop_changed_and_gone(engine, src, Path(source)) if src.kind == "files" else 0
        ds = _dataset(ray, indexer.store, src, DecodeSpec.for_model(model), decode_batch, report)
        if ds is None:
            report.removed = removed
            return report
        # Ray Data makes pool actors restartable (max_restarts=-1) with retried batches
        # (max_task_retries=-1) by default; tests/system/test_ray_build.py kills one mid-build.
        ds = ds.map_batches(
            EmbedWorker, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs=dict(model_dir=str(model.path), fingerprint=indexer.store.config.model_fingerprint,
                                       device=device, precision=precision,
                                       token_dtype=working_dtype(indexer.store.config.token_dtype),
                                       threads=max(1, int(actor_cpus))),
            num_gpus=1 if device.startswith("cuda") else 0, num_cpus=actor_cpus,
        )
        received = 0
        with BackgroundCommits(depth=2) as commits:
            for batch in ds.iter_batches(batch_size=commit_every, batch_format="numpy", prefetch_batches=2):
                received += len(batch["path"])
                ok = np.array([not e for e in batch["error"]], dtype=bool)
                report.skipped += [(str(p), str(e)) for p, e in zip(batch["path"][~ok], batch["error"][~ok])]
                if ok.any():
                    metas = [json.loads(m) if m else None for m in batch["meta"][ok]]
                    commits.submit(engine.add_embeddings, [str(p) for p in batch["path"][ok]],
                                   batch["vector"][ok], batch["tokens"][ok],
                                   metadata=metas if any(m is not None for m in metas) else None,
                                   hashes=[str(h) for h in batch["sha256"][ok]],
                                   stats=list(zip(batch["size"][ok].tolist(), batch["mtime_ns"][ok].tolist())),
                                   optimize=False)
                if on_batch is not None:
                    on_batch(received)
        for part in commits.wait():
            report.added += part.added
            report.unchanged += part.unchanged
        report.removed = removed
        engine.optimize()
    finally:
        if own_ray:
            ray.shutdown()
    return report


def _dataset(ray, store, src: Source, spec: DecodeSpec, decode_batch: int, report):
    """The decoded-rows dataset of the images of ``src`` not yet in the index (None: nothing new)."""
    if src.kind == "shards":
        rows = []
        for shard in src.paths:
            done = [e.path for e in store.live_under(shard + SHARD_SEPARATOR)]
            rows.append({"shard": shard, "done": json.dumps(done)})
            report.unchanged += len(done)
        return ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map_batches(
            decode_shards, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec, "rows_per_batch": decode_batch})
    todo = []
    for s in range(0, len(src.paths), LOOKUP_CHUNK):
        part = list(src.paths[s:s + LOOKUP_CHUNK])
        known = store.lookup_paths(part)
        report.unchanged += len(known)
        todo += [p for p in part if p not in known]
    if not todo:
        return None
    blocks = max(1, min(len(todo) // decode_batch, 10_000))
    return ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks).map_batches(
        decode_files, batch_size=decode_batch, batch_format="numpy", fn_kwargs={"spec": spec})


def _drop_changed_and_gone(engine, src: Source, root: Path) -> int:
    """Drop rows of files that changed or, for a folder, that are gone (indexer.changed_or_gone,
    the rule of the single-process build); how many."""
    store = engine.indexer.store
    rows: list[int] = []
    for s in range(0, len(src.paths), LOOKUP_CHUNK):
        changed, _ = changed_or_gone(store, list(src.paths[s:s + LOOKUP_CHUNK]))
        rows += changed
    if root.is_dir():
        rows += changed_or_gone(store, [], root=str(root), seen=set(src.paths))[1]
    return engine.indexer.remove_rows(rows) if rows else 0

"""Converting an index written by edje-search 0.2 to the Zarr token store, in place.

0.2 kept each commit's tokens (and int8 scales) as ``.npy`` segments under ``tokens/`` and
``token_scales/``. :func:`migrate` copies every row into ``tokens.zarr`` at the same row number,
so the manifest, the vectors and FAISS stay as they are, then commits once: the same row spans,
the new layout's checksums, and the setting ``token_store = zarr3`` that makes the index
readable by this release. The old files are deleted only after that commit. A crash before it
leaves the 0.2 index whole (the next run starts again); a crash after it leaves a migrated
index whose old files the next writer removes.

Rows whose bytes no longer match the row checksums 0.2 recorded, and the rows of a 0.2 segment
that cannot be read at all, are removed in the migration commit and listed (the next build
embeds those files again), as ``repair`` would; every copied row gets the new layout's checksums.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from ..config import IndexConfig
from ..errors import IndexCorrupt, StorageUnavailable
from . import layout
from .layout import CONFIG_FILE
from .lock import WriterLock
from .manifest import MANIFEST_FILE, Manifest
from .segments import SegmentArray, is_remote
from .token_store import LAYOUT, TOKENS_GROUP, TokenStore
from .zarr_rows import span_checksum

logger = logging.getLogger(__name__)

LEGACY_DIRS = ("tokens", "token_scales")
BLOCK_SHARDS = 16  # shards written per tensorstore call while copying


@dataclasses.dataclass
class MigrationReport:
    migrated: bool
    rows: int = 0
    dropped: list[str] = dataclasses.field(default_factory=list)  # paths of rows whose 0.2 segment was unreadable

    def summary(self) -> str:
        if not self.migrated:
            return "already in the current layout: nothing to do"
        return (f"{self.rows} token rows copied into {TOKENS_GROUP}; {len(self.dropped)} unreadable rows dropped"
                + (" (run build-index again to embed them)" if self.dropped else ""))


def _legacy_arrays(base: str, config: IndexConfig, segments: dict) -> dict[str, SegmentArray]:
    m, d = config.tokens_per_image, config.token_width
    arrays = {"tokens": SegmentArray(f"{base}/tokens", (m, d), config.token_dtype, segments.get("tokens", ()))}
    if config.token_dtype == "int8":
        arrays["token_scales"] = SegmentArray(f"{base}/token_scales", (m, 1), "float16",
                                              segments.get("token_scales", ()))
    return arrays


def migrate(directory: str | Path, *, lock_wait: float = 0.0, progress: bool = False) -> MigrationReport:
    """Convert the index at ``directory`` to the Zarr token store (a no-op when it already is)."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise IndexCorrupt(f"{directory} is not an edje-search index (no {CONFIG_FILE})")
    config = IndexConfig.load(directory / CONFIG_FILE)
    manifest = Manifest(directory / MANIFEST_FILE, readonly=False)
    try:
        with WriterLock(directory, wait=lock_wait):
            snap = manifest.snapshot()
            if snap.settings.get("token_store") == LAYOUT:
                return MigrationReport(False)
            return _copy_and_commit(directory, config, manifest, snap, progress)
    finally:
        manifest.close()


def _copy_and_commit(directory: Path, config: IndexConfig, manifest: Manifest, snap, progress: bool) -> MigrationReport:
    base = (config.store_url or str(directory)).rstrip("/")
    old = _legacy_arrays(base, config, snap.segments)
    for kind, arr in old.items():
        if arr.segments and not _exists(arr.url):
            raise IndexCorrupt(f"{arr.url} is missing: the 0.2 {kind} are not there to migrate (restore the "
                               f"folder, or build the index again)")
    remove_group(base)  # what an earlier, interrupted run wrote: no generation names it
    new = TokenStore(base, config.tokens_per_image, config.token_width, config.token_dtype, config.token_shard_rows,
                     snap.segments, scale_chunk_rows=config.scale_chunk_rows)
    records = manifest.segment_checksums()
    checks, lost = [], set()
    block = BLOCK_SHARDS * config.token_shard_rows
    n_rows = max((len(a) for a in old.values()), default=0)
    from tqdm import tqdm

    bar = tqdm(total=n_rows, unit="row", desc="migrate tokens", disable=not progress)
    for kind, arr in old.items():
        target = new.arrays[kind]
        for a in range(0, len(arr), block):
            b = min(a + block, len(arr))
            buf = np.zeros((b - a, *arr.row_shape), dtype=arr.dtype)
            for start, count in arr.segments:
                lo, hi = max(start, a), min(start + count, b)
                if lo >= hi:
                    continue
                try:
                    buf[lo - a:hi - a] = arr.get(np.arange(lo, hi))
                except StorageUnavailable:
                    raise  # not damage: the migration stops, nothing is dropped
                except IndexCorrupt as e:
                    logger.warning("0.2 segment unreadable, its rows are dropped: %s", e)
                    lost.update(range(lo, hi))
            target.write_rows(a, buf)
            if kind == "tokens":
                bar.update(b - a)
        for start, count in arr.segments:
            whole, rows = span_checksum(target.read_segment(start, count))
            kept = records.get((kind, start))
            if kept is not None:  # rows whose bytes changed since 0.2 committed them are dropped too
                was, now = np.frombuffer(kept[1], "<u4"), np.frombuffer(rows, "<u4")
                if was.shape == now.shape:
                    lost.update((np.nonzero(was != now)[0] + start).tolist())
            checks.append((kind, start, whole, rows))
    bar.close()
    layout.fault("migrate_after_copy")
    live = {e.row: e.path for e in manifest.iter_live(snap.generation)}
    dropped = sorted(r for r in lost if r in live)
    manifest.commit(generation=snap.generation + 1, n_rows=snap.n_rows, removed=dropped,
                    settings=dict(snap.settings, token_store=LAYOUT), checksums=checks)
    layout.fault("migrate_after_commit")
    new.publish(snap.n_rows, config.model_fingerprint)
    remove_legacy_tokens(base)
    logger.info("migrated %d token rows of %s to %s", n_rows, directory, TOKENS_GROUP)
    return MigrationReport(True, n_rows, sorted(live[r] for r in dropped))


def _exists(url: str) -> bool:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    return Path(url).is_dir()


def _remove_tree(url: str) -> bool:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=True)
        return True
    if not Path(url).is_dir():
        return False
    shutil.rmtree(url, ignore_errors=True)
    return True


def remove_group(base: str) -> None:
    _remove_tree(f"{base}/{TOKENS_GROUP}")


def remove_legacy_tokens(base: str) -> list[str]:
    """Delete the 0.2 token folders under ``base`` (after a migration committed); returns those removed."""
    return [name for name in LEGACY_DIRS if _remove_tree(f"{base.rstrip('/')}/{name}")]

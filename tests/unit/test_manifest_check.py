"""A manifest whose bytes changed is caught by verify and restored (or the loss named) by repair."""
from __future__ import annotations

import hashlib
import os
import sqlite3

import numpy as np

from edje_search.config import IndexConfig
from edje_search.storage.index_store import IndexStore


def _index_of_real_files(tmp_path, n=10):
    files = tmp_path / "files"
    files.mkdir()
    paths, hashes, stats = [], [], []
    for i in range(n):
        p = files / f"{i:06d}.png"
        data = os.urandom(100 + i)
        p.write_bytes(data)
        paths.append(str(p))
        hashes.append(hashlib.sha256(data).hexdigest())
        stats.append((p.stat().st_size, p.stat().st_mtime_ns))
    cfg = IndexConfig(factory="Flat", dim=8, tokens_per_image=2, token_width=4, token_dtype="float16",
                      model_path="m", model_fingerprint="f")
    store = IndexStore.create(tmp_path / "i", cfg)
    rng = np.random.default_rng(0)
    with store.writing():
        store.commit(paths, hashes, rng.standard_normal((n, 8)).astype(np.float32),
                     np.ones((n, 2, 4), np.float16), new_stats=stats)
    store.manifest.close()
    with sqlite3.connect(tmp_path / "i" / "manifest.sqlite") as db:  # everything into the main file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return tmp_path / "i", paths


def test_a_changed_path_byte_fails_verify_and_repair_drops_the_row_that_lost_its_path(tmp_path):
    root, paths = _index_of_real_files(tmp_path)
    assert IndexStore.open(root).verify() == []
    m = root / "manifest.sqlite"
    data = m.read_bytes()
    at = data.index(b"000003.png") + 5  # one byte of a stored path: 000003 -> 000007
    m.write_bytes(data[:at] + b"7" + data[at + 1:])
    problems = IndexStore.open(root).verify()
    assert any("integrity check" in p for p in problems), problems
    assert any("000007.png for 2 live rows (3, 7)" in p for p in problems), problems
    store = IndexStore.open(root, mode="r+")
    with store.writing():
        report = store.repair()
    assert any("rows [3]" in note and "cannot be restored" in note for note in report.manifest)
    again = IndexStore.open(root)
    assert again.verify() == [] and len(again) == 9
    assert again.lookup_paths([paths[7]])[paths[7]].row == 7 and again.lookup_paths([paths[3]]) == {}


def test_a_path_that_now_names_other_content_fails_verify(tmp_path):
    """The row's path was rewritten consistently (index and table), to a file the size and mtime
    of which match the row: only the content hash can tell."""
    root, paths = _index_of_real_files(tmp_path)
    os.unlink(paths[2])
    with sqlite3.connect(root / "manifest.sqlite") as db:
        size, mtime = db.execute("SELECT size, mtime_ns FROM rows WHERE row = 2").fetchone()
        db.execute("UPDATE rows SET path = ? WHERE row = 2", (os.fsencode(paths[2] + ".x"),))
    other = os.urandom(size)
    with open(paths[2] + ".x", "wb") as f:
        f.write(other)
    os.utime(paths[2] + ".x", ns=(mtime, mtime))
    problems = IndexStore.open(root).verify()
    assert problems == ["manifest row 2: its path holds other content than the row was indexed from "
                        "(the manifest's path was changed)"]
    store = IndexStore.open(root, mode="r+")
    with store.writing():
        assert store.repair().dropped == [paths[2] + ".x"]
    assert IndexStore.open(root).verify() == []

"""An index on a read-only folder answers info, verify and query, even when the last process to
close it was a writer (so no -wal/-shm files exist for SQLite's WAL mode to share)."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edje_search.storage import manifest as manifest_mod
from edje_search.storage.index_store import IndexStore

ROOT = Path(__file__).resolve().parents[2]


def _closed_by_a_writer(index: Path) -> None:
    """Checkpoint and close: SQLite deletes -wal and -shm when the last connection closes."""
    db = sqlite3.connect(index / "manifest.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert not (index / "manifest.sqlite-wal").exists() and not (index / "manifest.sqlite-shm").exists()


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*prefix, sys.executable, "-m", "edje_search_cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_a_read_only_mount_answers_info_verify_and_query(built_index, tmp_path):
    """A real read-only bind mount, in a private mount namespace (works as root, where chmod
    does not stop writes)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    _closed_by_a_writer(built_index)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {built_index} {mnt} && "
                            f"! touch {mnt}/probe 2>/dev/null"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private read-only bind mount here: {probe.stderr.strip()}")
    script = (f"mount --bind -o ro {built_index} {mnt} && exec \"$@\"")
    prefix = ("unshare", "-rm", "sh", "-c", script, "sh")
    info = _cli("info", "--index", str(mnt), "--json", prefix=prefix)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["images"] == 40
    verify = _cli("verify", "--index", str(mnt), prefix=prefix)
    assert verify.returncode == 0 and "ok: 40 images" in verify.stdout, verify.stderr
    query = _cli("query", "a red circle", "--index", str(mnt), "--json", "-k", "3", prefix=prefix)
    assert query.returncode == 0, query.stderr
    hits = json.loads(query.stdout)[0]["hits"]
    assert len(hits) == 3 and all(Path(h["path"]).is_file() for h in hits), hits
    assert not (built_index / "manifest.sqlite-shm").exists()  # nothing was written through the mount


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_folder_without_write_permission_opens(tmp_path, built_index):
    _closed_by_a_writer(built_index)
    built_index.chmod(0o555)
    try:
        store = IndexStore.open(built_index)
        assert len(store) == 40 and store.verify() == []
    finally:
        built_index.chmod(0o755)


def test_the_immutable_uri_is_chosen_only_without_write_access_or_shared_files(tmp_path, built_index, monkeypatch):
    _closed_by_a_writer(built_index)
    path = built_index / "manifest.sqlite"
    assert not manifest_mod._read_only_folder(path)
    real_access = os.access
    monkeypatch.setattr(manifest_mod.os, "access",
                        lambda p, mode, **kw: False if Path(p) == built_index and mode == os.W_OK
                        else real_access(p, mode, **kw))
    assert manifest_mod._read_only_folder(path)
    assert len(IndexStore.open(built_index)) == 40
    (built_index / "manifest.sqlite-wal").touch()
    (built_index / "manifest.sqlite-shm").touch()
    assert not manifest_mod._read_only_folder(path)  # a writer's shared files exist: plain mode=ro

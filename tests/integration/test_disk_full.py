"""`repair` on a full disk: one line naming the file, and the index as it was."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edje_search.config import IndexConfig
from edje_search.storage.index_store import IndexStore

ROOT = Path(__file__).resolve().parents[2]


def test_repair_on_a_full_disk_fails_in_one_line_and_leaves_the_index_whole(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace, filled to within a few KiB: at every margin
    the repair either succeeds or fails in one line naming a file, and the index still verifies."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    src = tmp_path / "i"
    store = IndexStore.create(src, IndexConfig(factory="Flat", dim=8, tokens_per_image=2, token_width=4,
                                               model_path="m", model_fingerprint="f"))
    rng = np.random.default_rng(0)
    with store.writing():
        store.commit([f"/p{i}" for i in range(20)], ["h"] * 20, rng.standard_normal((20, 8)).astype(np.float32),
                     np.ones((20, 2, 4), np.float16))
    store.manifest.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    check = (f"{sys.executable} -c \"from edje_search.storage.index_store import IndexStore; "
             f"s = IndexStore.open('{mnt}/idx'); assert len(s) == 20 and s.verify() == [], s.verify()\"")
    failures = []
    for free_kib in (0, 16, 32, 40, 48):
        script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && cp -r {src} {mnt}/idx && "
                  f"(cat /dev/zero > {mnt}/fill 2>/dev/null; true) && truncate -s -{free_kib}K {mnt}/fill && "
                  f"{sys.executable} -m edje_search_cli.main repair --index {mnt}/idx; echo \"rc=$?\" >&2; "
                  f"rm {mnt}/fill && {check}")
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                              timeout=300)
        if "mount" in proc.stderr and "rc=" not in proc.stderr:
            pytest.skip(f"no private tmpfs mount here: {proc.stderr.strip()}")
        assert proc.returncode == 0, f"index damaged after a repair with {free_kib} KiB free: {proc.stderr}"
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        if lines:
            failures.append(lines)
            assert len(lines) == 1 and f"{mnt}/idx/" in lines[0] and ("disk" in lines[0] or "space" in lines[0]), \
                proc.stderr
            assert "Error in" not in proc.stderr and "Traceback" not in proc.stderr
    assert failures, "the disk was never full enough to fail"

"""No file can stop a build: FIFOs, devices, sockets, huge and extreme-aspect images, files
deleted mid-build. Each is skipped with a reason in INDEX/skipped.jsonl and the build exits 0.

The builds run as separate processes with a wall-clock limit, so a file that made the build
hang (a FIFO opened for reading blocks forever) fails the test instead of stalling the suite.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from edje_search.images import (IMAGE_EXTENSIONS, DecodeLimits, ImageFileDataset, Unusable, check_dimensions,
                                decode_image, is_image_path, read_image_file, time_limit)

BUILD_SECONDS = 240  # generous: a healthy build of this corpus takes seconds; a hang never ends

# Runs `edje-search ARGS...` after deleting DOOMED between the folder walk and the reading of its
# bytes: the real walk lists it, then it is gone before the loader gets to it.
DELETE_MID_BUILD = """
import os, sys
import edje_search.indexer as indexer
from edje_search_cli.main import main

doomed, argv = sys.argv[1], sys.argv[2:]
real_walk = indexer.iter_image_files

def walk_then_delete(root, *args, **kwargs):
    yield from real_walk(root, *args, **kwargs)
    os.remove(doomed)

indexer.iter_image_files = walk_then_delete
sys.argv = ["edje-search", *argv]
main()
"""


def _png(path, size=(32, 32), seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_hostile_folder(root) -> tuple[set[str], dict[str, str]]:
    """Good images plus one of each hostile kind; returns (good paths, bad path -> expected reason)."""
    root.mkdir()
    good = set()
    for i in range(3):
        _png(root / f"good{i}.png", seed=i)
        good.add(str(root / f"good{i}.png"))
    bad = {}
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block until a writer comes: forever
    bad[str(root / "pipe.jpg")] = "named pipe"
    os.symlink("/dev/zero", root / "zero.jpg")  # endless bytes
    bad[str(root / "zero.jpg")] = "character device"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "sock.png"))
    sock.close()  # the socket file stays behind
    bad[str(root / "sock.png")] = "socket"
    Image.new("RGB", (1, 20000), (90, 120, 200)).save(root / "strip.png")  # tiny file, 20000:1
    bad[str(root / "strip.png")] = "extreme aspect ratio"
    with open(root / "huge.png", "wb") as f:  # sparse: no disk used, but over the size limit
        f.truncate(300 * 2**20)
    bad[str(root / "huge.png")] = "too large"
    jpg = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(jpg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    bad[str(root / "truncated.jpg")] = "corrupt"
    return good, bad


def _build(args: list, prefix: list[str]) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=BUILD_SECONDS,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"build still running after {BUILD_SECONDS} s: a file made it hang")
    assert proc.returncode == 0, f"exit {proc.returncode} after {time.monotonic() - t0:.0f} s: {proc.stderr[-2000:]}"
    return proc


def _skipped(index) -> dict[str, str]:
    lines = (index / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["path"]: json.loads(line)["reason"] for line in lines}


@pytest.mark.parametrize("workers", [0, 1])
def test_hostile_files_are_skipped_with_reasons_and_the_build_finishes(tmp_path, tiny_model_dir, workers):
    good, bad = make_hostile_folder(tmp_path / "photos")
    doomed = tmp_path / "photos" / "doomed.png"
    _png(doomed, seed=9)
    bad[str(doomed)] = "no longer exists"
    index = tmp_path / "idx"
    proc = _build(["build-index", tmp_path / "photos", "--index", index, "--model", tiny_model_dir,
                   "--workers", workers, "--no-progress", "--json"],
                  [sys.executable, "-c", DELETE_MID_BUILD, doomed])
    report = json.loads(proc.stdout)
    assert report["added"] == len(good) and report["images"] == len(good)
    skipped = _skipped(index)
    assert set(skipped) == set(bad)
    for path, needle in bad.items():
        assert needle in skipped[path], (path, skipped[path])
    # the skipped files are not half-indexed either: verify is clean and a re-run adds nothing
    verify = _build(["verify", "--index", index, "--json"], [sys.executable, "-m", "edje_search_cli"])
    assert json.loads(verify.stdout)["ok"] is True


# ------------------------------------------------------------------------ the rules, in-process
def _bounded(fn, seconds: float = 20.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it has not returned in time."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_special_files_are_refused_without_being_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "broken.jpg")
    for name, needle in [("pipe.jpg", "named pipe"), ("zero.jpg", "character device"),
                         ("broken.jpg", "broken symbolic link"), ("gone.jpg", "no longer exists")]:
        with pytest.raises(Unusable, match=needle):
            _bounded(lambda n=name: read_image_file(tmp_path / n))
    _png(tmp_path / "ok.png")
    data, st = read_image_file(tmp_path / "ok.png")
    assert len(data) == st.st_size == (tmp_path / "ok.png").stat().st_size
    with pytest.raises(Unusable, match="too large"):
        read_image_file(tmp_path / "ok.png", max_bytes=10)


def test_the_aspect_rule_follows_the_model_input_size():
    # the "shortest" resize makes S x S*aspect before its centre crop
    for size in (32, 384):
        with pytest.raises(Unusable, match="extreme aspect ratio"):
            check_dimensions(1, 20000, size)
    check_dimensions(4000, 3000, 384)  # a camera photo
    check_dimensions(3840, 384, 384)  # a 10:1 panorama: 384 x 3840 is fine
    with pytest.raises(Unusable, match="extreme aspect ratio"):
        check_dimensions(384 * 200, 384, 384)  # 200:1 at 384 px: 29 Mpx intermediate
    check_dimensions(384 * 200, 384, 32)  # the same strip under a 32-px model: 2 Mpx
    check_dimensions(1, 20000, 384, resize_mode="squash")  # squash never exceeds S x S
    with pytest.raises(Unusable, match="too large"):
        check_dimensions(20000, 20000, 384)
    buf = io.BytesIO()
    Image.new("RGB", (1, 20000)).save(buf, "PNG")
    with pytest.raises(Unusable, match="extreme aspect ratio"):
        decode_image(buf.getvalue(), 32, resize_mode="shortest")
    assert decode_image(buf.getvalue()).size == (1, 20000)  # without a model resize it is a small image


def _dataset(tmp_path, transform, **limits):
    _png(tmp_path / "a.png")
    return ImageFileDataset([str(tmp_path / "a.png")], transform, min_size=32, resize_mode="shortest",
                            limits=DecodeLimits(**limits))


def test_a_memory_error_in_decoding_skips_the_file(tmp_path):
    def transform(img):
        raise MemoryError()

    item = _dataset(tmp_path, transform)[0]
    assert item["pixels"] is None and item["error"] == "out of memory while decoding"


def test_decoding_has_a_time_limit(tmp_path):
    def slow(img):
        time.sleep(30)

    t0 = time.monotonic()
    item = _dataset(tmp_path, slow, seconds=0.3)[0]
    assert time.monotonic() - t0 < 10
    assert "took longer than 0.3 s" in item["error"]
    # in a DataLoader worker process too (each worker arms its own alarm)
    from edje_search.images import image_loader

    t0 = time.monotonic()
    batches = list(image_loader([str(tmp_path / "a.png")] * 2, slow, 2, 1, min_size=32, resize_mode="shortest",
                                limits=DecodeLimits(seconds=0.3)))
    assert time.monotonic() - t0 < 20
    assert [reason for b in batches for _, reason in b["failed"]] == ["took longer than 0.3 s to read and decode"] * 2
    with time_limit(5) as armed:  # the alarm is put back as it was
        assert armed
    import signal

    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL


def test_one_extension_list():
    assert {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif"} <= IMAGE_EXTENSIONS
    assert is_image_path("/x/IMG_0001.JPG") and is_image_path("a.Avif") and not is_image_path("x.txt")
    assert not is_image_path("photo.jpg.txt") and not is_image_path("jpg")


def test_heic_photos_decode_through_pillow_heif():
    pillow_heif = pytest.importorskip("pillow_heif")
    assert ".heic" in IMAGE_EXTENSIONS and ".heif" in IMAGE_EXTENSIONS
    heif = pillow_heif.from_pillow(Image.new("RGB", (40, 30), (200, 20, 20)))
    buf = io.BytesIO()
    heif.save(buf, quality=90)
    img = decode_image(buf.getvalue())
    assert img.size == (40, 30) and img.mode == "RGB"
    r, g, b = img.getpixel((20, 15))
    assert r > 150 and g < 80 and b < 80


def test_symlinked_folders_are_followed_only_inside_the_root(tmp_path):
    from edje_search.images import iter_image_files

    root, outside = tmp_path / "photos", tmp_path / "other"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "real" / "a.png").write_bytes(b"x")
    (outside / "b.png").write_bytes(b"x")
    (root / "inside").symlink_to(root / "real")
    (root / "up").symlink_to(tmp_path)
    (root / "top").symlink_to("/")
    found = sorted(p.relative_to(root).as_posix() for p in iter_image_files(root))
    assert found == ["inside/a.png"]  # each folder once (the link is met first), nothing from outside

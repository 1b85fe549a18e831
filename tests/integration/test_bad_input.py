"""A corpus of awkward and broken files: the build succeeds, keeps every usable image, and
lists every unusable file with a reason."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edje_search import Engine
from edje_search.images import decode_image
from edje_search_cli.main import cli, register_commands

register_commands()


def _rgb(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_corpus(root) -> tuple[set[str], set[str]]:
    """Write good and bad files; returns (good paths, bad paths)."""
    good, bad = set(), set()

    def save(rel, img, fmt=None, **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, fmt, **kw)
        good.add(str(p))

    save("plain.jpg", _rgb(0))
    save("cmyk.jpg", _rgb(1).convert("CMYK"))
    save("palette.png", _rgb(2).convert("P"))
    save("rgba.png", _rgb(3).convert("RGBA"))
    save("gray.png", _rgb(4).convert("L"))
    save("sixteen.png", Image.fromarray((np.arange(1200, dtype=np.uint16) * 50).reshape(30, 40)))
    frames = [_rgb(5), _rgb(6)]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:])
    save("anim.webp", frames[0], "WEBP", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    save("rotated.jpg", _rgb(7, (40, 20)), exif=exif)
    save("ünïcødé 写真.png", _rgb(8))
    save("/".join(f"d{i}" for i in range(12)) + "/deep.png", _rgb(9))
    raw = os.fsencode(str(root)) + b"/bad-\xff-name.png"  # not valid UTF-8
    with open(raw, "wb") as f:
        buf = io.BytesIO()
        _rgb(10).save(buf, "PNG")
        f.write(buf.getvalue())
    good.add(os.fsdecode(raw))

    def write(rel, data: bytes):
        p = root / rel
        p.write_bytes(data)
        bad.add(str(p))

    write("empty.jpg", b"")
    jpg = io.BytesIO()
    _rgb(11).save(jpg, "JPEG")
    write("truncated.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 3])
    png = io.BytesIO()
    _rgb(12).save(png, "PNG")
    write("truncated.png", png.getvalue()[:80])
    write("notes.png", b"this is a text file, not a picture")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 Mpx, tiny on disk
    write("bomb.png", bomb.getvalue())
    os.symlink(root / "nowhere.jpg", root / "broken_link.jpg")  # broken symlinks are unreadable
    bad.add(str(root / "broken_link.jpg"))
    os.symlink(root, root / "loop")  # a symlink loop must not hang the walk
    return good, bad


def test_bad_input_corpus_builds(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus"
    good, bad = make_corpus(corpus)
    index = tmp_path / "idx"
    result = CliRunner().invoke(cli, ["build-index", str(corpus), "--index", str(index), "--model",
                                      str(tiny_model_dir), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{len(bad)} skipped" in result.output
    indexed = {e.path for e in Engine.from_pretrained(index).store.entries}
    assert indexed == good
    skipped = {json.loads(line)["path"]: json.loads(line)["reason"]
               for line in (index / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == bad and all(skipped.values())
    assert "too large" in skipped[str(corpus / "bomb.png")] or "bomb" in skipped[str(corpus / "bomb.png")].lower()


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _rgb(0, (40, 20)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "L", "I;16"])
def test_every_mode_decodes_to_rgb(mode):
    img = _rgb(1).convert(mode) if mode != "I;16" else Image.fromarray(np.full((5, 5), 40000, np.uint16))
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB"


def test_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_input():
    img = _rgb(2, (1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the reduced decode must still come out upright
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif)
    full = decode_image(buf.getvalue())
    small = decode_image(buf.getvalue(), min_size=256)
    assert full.size == (1200, 1600)
    assert small.size == (300, 400)  # 1/4 scale: the smallest that keeps both sides >= 256
    # same picture: compare after bringing both to the same size
    a = np.asarray(full.resize((75, 100), Image.BILINEAR), dtype=np.float32)
    b = np.asarray(small.resize((75, 100), Image.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 6
    png = io.BytesIO()
    img.save(png, "PNG")
    assert decode_image(png.getvalue(), min_size=256).size == (1600, 1200)  # only JPEGs have DCT scaling

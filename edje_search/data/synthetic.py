"""A procedurally generated compositional image-caption data set ("shapes scenes").

Each image holds two kinds of objects; telling captions apart needs attribute binding
(which colour goes with which shape and size), spatial relations and counting, which a
bag-of-features embedding struggles with and a joint encoder can learn. Output is in the
BLIP/ALBEF annotation format (see :mod:`edje_search.data.annotations`), deterministic by seed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..fsutil import atomic_write_text
from .glyphs import render_frame_scene, render_glyph_scene

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.14, "large": 0.26}  # radius as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclasses.dataclass(frozen=True)
class Thing:
    size: str
    color: str
    shape: str

    def phrase(self, count: int = 1) -> str:
        noun = self.shape + ("s" if count > 1 else "")
        det = "a" if count == 1 else NUMBERS[count]
        return f"{det} {self.size} {self.color} {noun}"


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float, side: int) -> None:
    r = SIZES[thing.size] * side / 2 * 1.6
    fill = COLORS[thing.color]
    if thing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif thing.shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _random_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES))


def _background(rng: random.Random, side: int) -> Image.Image:
    base = rng.randint(60, 120)
    img = Image.new("RGB", (side, side), (base, base, base))
    px = img.load()
    for _ in range(side * side // 6):  # speckle noise so pixels are not trivially flat
        x, y = rng.randrange(side), rng.randrange(side)
        v = base + rng.randint(-25, 25)
        px[x, y] = (v, v, v)
    return img


def render_relation_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    """Two different objects in a spatial relation; captions state it both ways."""
    a = _random_thing(rng)
    b = _random_thing(rng)
    while b == a:
        b = _random_thing(rng)
    rel = rng.choice(list(RELATIONS))
    lo, hi = 0.22 * side, 0.78 * side
    along_lo, along_hi = rng.uniform(lo, 0.42 * side), rng.uniform(0.58 * side, hi)
    across_a, across_b = rng.uniform(lo, hi), rng.uniform(lo, hi)
    first, second = (along_lo, along_hi) if rel in ("left of", "above") else (along_hi, along_lo)
    if rel in ("left of", "right of"):
        pa, pb = (first, across_a), (second, across_b)
    else:
        pa, pb = (across_a, first), (across_b, second)
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    for thing, (x, y) in sorted([(a, pa), (b, pb)], key=lambda t: -SIZES[t[0].size]):
        _draw(draw, thing, x, y, side)
    captions = [f"{a.phrase()} {rel} {b.phrase()}", f"{b.phrase()} {RELATIONS[rel]} {a.phrase()}"]
    return img, captions


def render_count_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    """1-3 copies of one small object and one copy of another; captions count them."""
    a = Thing("small", rng.choice(list(COLORS)), rng.choice(SHAPES))
    b = Thing("small", rng.choice(list(COLORS)), rng.choice(SHAPES))
    while b == a:
        b = Thing("small", rng.choice(list(COLORS)), rng.choice(SHAPES))
    n = rng.randint(1, 3)
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    cells = [(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)]
    rng.shuffle(cells)
    for thing, (x, y) in zip([a] * n + [b], cells):
        jitter = 0.05 * side
        _draw(draw, thing, x * side + rng.uniform(-jitter, jitter), y * side + rng.uniform(-jitter, jitter), side)
    captions = [f"{a.phrase(n)} and {b.phrase()}", f"{b.phrase()} and {a.phrase(n)}"]
    return img, captions


# ------------------------------------------------------------------------ held-out variant
# A second generator that shares nothing with the one above but the idea (binding, relations,
# counting): other shapes, colours, size words, backgrounds, layouts and caption templates.
# Recipes are checked on it so that they are tuned for the method, not for one generator.
HELDOUT_COLORS = {
    "pink": (250, 120, 180), "brown": (130, 75, 30), "black": (15, 15, 15), "lime": (170, 235, 40),
    "navy": (20, 30, 120), "teal": (0, 130, 130), "magenta": (210, 0, 210), "beige": (230, 205, 160),
}
HELDOUT_SHAPES = ("star", "cross", "hexagon", "ring", "heart")
HELDOUT_SIZES = {"tiny": 0.11, "big": 0.24}
HELDOUT_RELATIONS = {"to the left of": "to the right of", "to the right of": "to the left of",
                     "on top of": "underneath", "underneath": "on top of"}
HELDOUT_NUMBERS = {1: "one", 2: "a pair of", 3: "three", 4: "four"}


def _polygon(cx: float, cy: float, radii: list[float], turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(turn + 2 * math.pi * i / n), cy + r * math.sin(turn + 2 * math.pi * i / n))
            for i, r in enumerate(radii)]


def _draw_heldout(draw: ImageDraw.ImageDraw, size: str, color: str, shape: str, cx: float, cy: float,
                  side: int) -> None:
    r = HELDOUT_SIZES[size] * side / 2 * 1.7
    fill = HELDOUT_COLORS[color]
    if shape == "star":
        draw.polygon(_polygon(cx, cy, [r, r * 0.45] * 5), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, 0.0), fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.4)))
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # heart: two lobes and a point
        lobe = r * 0.5
        draw.ellipse([cx - r, cy - r * 0.7, cx - r + 2 * lobe, cy - r * 0.7 + 2 * lobe], fill=fill)
        draw.ellipse([cx + r - 2 * lobe, cy - r * 0.7, cx + r, cy - r * 0.7 + 2 * lobe], fill=fill)
        draw.polygon([(cx - r, cy - r * 0.2), (cx + r, cy - r * 0.2), (cx, cy + r)], fill=fill)


def _heldout_background(rng: random.Random, side: int) -> Image.Image:
    """A light two-colour vertical gradient (the other generator uses grey speckle)."""
    top = [rng.randint(150, 235) for _ in range(3)]
    bottom = [min(255, max(0, c + rng.randint(-50, 50))) for c in top]
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    for y in range(side):
        t = y / max(side - 1, 1)
        draw.line([(0, y), (side, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def _heldout_thing(rng: random.Random, size: str | None = None) -> tuple[str, str, str]:
    return (size or rng.choice(list(HELDOUT_SIZES)), rng.choice(list(HELDOUT_COLORS)), rng.choice(HELDOUT_SHAPES))


def _heldout_phrase(thing: tuple[str, str, str], count: int = 1) -> str:
    size, color, shape = thing
    noun = shape + ("es" if shape == "cross" and count > 1 else "s" if count > 1 else "")
    det = "a" if count == 1 else HELDOUT_NUMBERS[count]
    return f"{det} {size} {color} {noun}"


def render_heldout_relation_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    """Two objects placed in opposite halves (with vertical or horizontal jitter across them)."""
    a, b = _heldout_thing(rng), _heldout_thing(rng)
    while b == a:
        b = _heldout_thing(rng)
    rel = rng.choice(list(HELDOUT_RELATIONS))
    near, far = rng.uniform(0.18, 0.38) * side, rng.uniform(0.62, 0.82) * side
    first, second = (near, far) if rel in ("to the left of", "on top of") else (far, near)
    across_a, across_b = rng.uniform(0.2, 0.8) * side, rng.uniform(0.2, 0.8) * side
    horizontal = rel in ("to the left of", "to the right of")
    pa = (first, across_a) if horizontal else (across_a, first)
    pb = (second, across_b) if horizontal else (across_b, second)
    img = _heldout_background(rng, side)
    draw = ImageDraw.Draw(img)
    for thing, (x, y) in sorted([(a, pa), (b, pb)], key=lambda t: -HELDOUT_SIZES[t[0][0]]):
        _draw_heldout(draw, *thing, x, y, side)
    pa_s, pb_s = _heldout_phrase(a), _heldout_phrase(b)
    captions = [f"there is {pa_s} {rel} {pb_s}", f"{pb_s} sits {HELDOUT_RELATIONS[rel]} {pa_s}"]
    return img, captions


def render_heldout_count_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    """1-4 tiny copies of one object in a ring around the centre, one big other object in the middle."""
    a = _heldout_thing(rng, "tiny")
    b = _heldout_thing(rng, "big")
    while b[1:] == a[1:]:
        b = _heldout_thing(rng, "big")
    n = rng.randint(1, 4)
    img = _heldout_background(rng, side)
    draw = ImageDraw.Draw(img)
    _draw_heldout(draw, *b, side / 2, side / 2, side)
    start = rng.uniform(0, 2 * math.pi)
    for i in range(n):
        angle = start + 2 * math.pi * i / 4
        _draw_heldout(draw, *a, side / 2 + 0.36 * side * math.cos(angle), side / 2 + 0.36 * side * math.sin(angle),
                      side)
    captions = [f"{_heldout_phrase(a, n)} around {_heldout_phrase(b)}",
                f"an image with {_heldout_phrase(b)} in the middle and {_heldout_phrase(a, n)}"]
    return img, captions


# style -> (scene drawn with probability 1 - count_fraction, scene drawn with count_fraction)
STYLES = {"shapes": (render_relation_scene, render_count_scene),
          "heldout": (render_heldout_relation_scene, render_heldout_count_scene),
          "glyphs": (render_glyph_scene, render_frame_scene)}


def make_dataset(out_dir: str | Path, *, n_train: int = 20000, n_val: int = 500, n_test: int = 1000,
                 image_size: int = 64, seed: int = 0, count_fraction: float = 0.25,
                 progress: bool = True, style: str = "shapes") -> dict[str, Path]:
    """Render the splits under ``out_dir``; returns the annotation file of each split.

    ``style`` picks the generator: ``"shapes"`` (the project's), ``"heldout"`` (other shapes,
    colours, backgrounds, layouts and caption templates, for checking that a recipe carries over)
    or ``"glyphs"`` (:mod:`.glyphs`: order, direction and containment, solid or hollow objects).

    Train entries get one caption each (image_id groups captions of the same image); val and
    test entries list every caption of the image.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    relation_scene, count_scene = STYLES[style]
    out_dir = Path(out_dir)
    files = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        rng = random.Random(f"{seed}-{offset}")
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i in tqdm(range(n), desc=f"rendering {split}", disable=not progress, unit="img"):
            render = count_scene if rng.random() < count_fraction else relation_scene
            img, captions = render(rng, image_size)
            rel = f"{split}/{i:06d}.png"
            img.save(out_dir / rel)
            if split == "train":
                entries += [{"image": rel, "caption": c, "image_id": f"{split}-{i}"} for c in captions]
            else:
                entries.append({"image": rel, "caption": captions})
        path = out_dir / f"{split}.json"
        atomic_write_text(path, json.dumps(entries, indent=0))
        files[split] = path
    return files

"""A procedurally generated compositional image-caption data set ("shapes scenes").

Each image holds two kinds of objects; telling captions apart needs attribute binding
(which colour goes with which shape and size), spatial relations and counting, which a
bag-of-features embedding struggles with and a joint encoder can learn. Output is in the
BLIP/ALBEF annotation format (see :mod:`edje_search.data.annotations`), deterministic by seed.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

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


def make_dataset(out_dir: str | Path, *, n_train: int = 20000, n_val: int = 500, n_test: int = 1000,
                 image_size: int = 64, seed: int = 0, count_fraction: float = 0.25,
                 progress: bool = True) -> dict[str, Path]:
    """Render the splits under ``out_dir``; returns the annotation file of each split.

    Train entries get one caption each (image_id groups captions of the same image); val and
    test entries list every caption of the image.
    """
    out_dir = Path(out_dir)
    files = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        rng = random.Random(f"{seed}-{offset}")
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i in tqdm(range(n), desc=f"rendering {split}", disable=not progress, unit="img"):
            render = render_count_scene if rng.random() < count_fraction else render_relation_scene
            img, captions = render(rng, image_size)
            rel = f"{split}/{i:06d}.png"
            img.save(out_dir / rel)
            if split == "train":
                entries += [{"image": rel, "caption": c, "image_id": f"{split}-{i}"} for c in captions]
            else:
                entries.append({"image": rel, "caption": captions})
        path = out_dir / f"{split}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(entries, indent=0))
        tmp.replace(path)
        files[split] = path
    return files

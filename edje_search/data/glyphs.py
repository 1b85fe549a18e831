"""A third generator style, ``--style glyphs``: order, direction and containment.

It shares no object, colour or relation word with ``shapes`` and ``heldout`` and tests other
compositions: every object has a fill (solid or hollow) as well as a colour, so a caption binds
two attributes to each noun.

- Row: three objects left to right; the captions list them in order, one left to right and one
  right to left.
- Pointing: an arrow beside an object, pointing at it; the captions say from which side.
- Frame: an object inside a square frame, another outside it.

Every object in one image has its own colour. Backgrounds are grey noise (no palette colour is
grey), so each colour's pixels show where its object was drawn.
"""
from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

GLYPH_COLORS = {
    "gold": (250, 190, 0), "maroon": (128, 0, 32), "olive": (110, 120, 20), "sky": (110, 180, 255),
    "coral": (255, 110, 80), "violet": (130, 70, 255), "mint": (120, 240, 170),
}
GLYPH_SHAPES = ("moon", "kite", "bar", "drop")
GLYPH_FILLS = ("solid", "hollow")
SIDES = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}
FROM_SIDE = {"left": "from the left", "right": "from the right", "above": "from above", "below": "from below"}
ON_SIDE = {"left": "on its left", "right": "on its right", "above": "above it", "below": "below it"}
RADIUS = 0.11  # of the image side


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of ``shape`` of radius ``r`` centred on (cx, cy)."""
    if shape == "kite":
        pts = [(0, -1), (0.6, -0.25), (0, 1), (-0.6, -0.25)]
    elif shape == "bar":
        pts = [(-1, -0.35), (1, -0.35), (1, 0.35), (-1, 0.35)]
    elif shape == "drop":  # a round bottom and a point on top
        pts = [(0, -1)] + [(0.6 * math.cos(a), 0.35 + 0.6 * math.sin(a))
                           for a in (math.radians(d) for d in range(-30, 215, 15))]
    else:  # moon: a crescent opening to the right
        outer = [(math.cos(a), math.sin(a)) for a in (math.radians(d) for d in range(60, 301, 15))]
        inner = [(0.45 + 0.75 * math.cos(a), 0.75 * math.sin(a))
                 for a in (math.radians(d) for d in range(255, 104, -15))]
        pts = outer + inner
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _arrow(cx: float, cy: float, r: float, direction: tuple[int, int]) -> list[tuple[float, float]]:
    """An arrow centred on (cx, cy) pointing along ``direction`` (a unit step in x or y)."""
    pts = [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)]
    dx, dy = direction
    return [(cx + r * (x * dx - y * dy), cy + r * (x * dy + y * dx)) for x, y in pts]


def _draw_polygon(draw: ImageDraw.ImageDraw, pts, color: str, fill: str, r: float) -> None:
    rgb = GLYPH_COLORS[color]
    if fill == "solid":
        draw.polygon(pts, fill=rgb)
    else:
        draw.polygon(pts, outline=rgb, width=max(1, round(r * 0.18)))


def _background(rng: random.Random, side: int) -> Image.Image:
    base = rng.randint(150, 200)
    img = Image.new("RGB", (side, side), (base, base, base))
    px = img.load()
    for _ in range(side * side // 5):
        v = base + rng.randint(-20, 20)
        px[rng.randrange(side), rng.randrange(side)] = (v, v, v)
    return img


def _things(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """``n`` (fill, colour, shape) objects of different colours."""
    colors = rng.sample(list(GLYPH_COLORS), n)
    return [(rng.choice(GLYPH_FILLS), c, rng.choice(GLYPH_SHAPES)) for c in colors]


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def phrase(thing: tuple[str, str, str]) -> str:
    fill, color, shape = thing
    return f"a {fill} {color} {shape}"


def render_row_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    things = _things(rng, 3)
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    r = RADIUS * side
    for thing, x in zip(things, (0.2, 0.5, 0.8)):
        cx = x * side + rng.uniform(-0.03, 0.03) * side
        cy = rng.uniform(0.3, 0.7) * side
        _draw_polygon(draw, _outline(thing[2], cx, cy, r), thing[1], thing[0], r)
    a, b, c = (phrase(t) for t in things)
    return img, [f"from left to right: {a}, {b}, {c}", f"reading right to left there is {c}, then {b}, then {a}"]


def render_pointing_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    (fill, target_color, shape), (_, arrow_color, _) = _things(rng, 2)
    where = rng.choice(list(SIDES))
    dx, dy = SIDES[where]
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    r = RADIUS * side
    cx, cy = (0.5 + rng.uniform(-0.08, 0.08)) * side, (0.5 + rng.uniform(-0.08, 0.08)) * side
    _draw_polygon(draw, _outline(shape, cx, cy, r), target_color, fill, r)
    gap = rng.uniform(0.27, 0.33) * side
    draw.polygon(_arrow(cx + dx * gap, cy + dy * gap, r, (-dx, -dy)), fill=GLYPH_COLORS[arrow_color])
    target = phrase((fill, target_color, shape))
    arrow = article(arrow_color) + " arrow"
    return img, [f"{arrow} points at {target} {FROM_SIDE[where]}",
                 f"{target} with {arrow} {ON_SIDE[where]} pointing at it"]


def render_frame_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    inside, outside, (_, frame_color, _) = _things(rng, 3)
    img = _background(rng, side)
    draw = ImageDraw.Draw(img)
    r = RADIUS * side
    half = 0.2 * side
    frame_x = rng.choice((0.27, 0.73)) * side
    frame_y = rng.uniform(0.35, 0.65) * side
    draw.rectangle([frame_x - half, frame_y - half, frame_x + half, frame_y + half], outline=GLYPH_COLORS[frame_color],
                   width=max(1, round(side / 48)))
    _draw_polygon(draw, _outline(inside[2], frame_x, frame_y, r * 0.85), inside[1], inside[0], r * 0.85)
    out_x = side - frame_x + rng.uniform(-0.04, 0.04) * side
    out_y = rng.uniform(0.3, 0.7) * side
    _draw_polygon(draw, _outline(outside[2], out_x, out_y, r), outside[1], outside[0], r)
    a, b = phrase(inside), phrase(outside)
    return img, [f"{a} inside {article(frame_color)} frame, {b} outside",
                 f"outside the {frame_color} frame is {b}; inside it, {a}"]


def render_glyph_scene(rng: random.Random, side: int) -> tuple[Image.Image, list[str]]:
    """A row (60%) or a pointing scene (40%)."""
    return (render_row_scene if rng.random() < 0.6 else render_pointing_scene)(rng, side)

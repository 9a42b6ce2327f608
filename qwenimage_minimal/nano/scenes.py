"""Synthetic captioned scenes, and a scorer that reads them back from pixels: the data and the
yardstick of the nano model (a Qwen-Image small enough to train on a CPU).

A scene is one or two objects on a plain background; each object is a named colour, a shape, a
size and a cell of a 3 x 3 grid. Its caption states all of that in plain English:

    "a small red circle at the top left and a large blue square at the bottom right"

Each caption admits many pictures (`vary`): the object's size is drawn from its size word's range, its
centre moves inside its cell as far as keeps the whole object there (about +-10 px for a small object at
128 px), its colour varies slightly around the named one and the background's tint a little. So a model
trained on them has a distribution to sample, not one right answer per caption, and different seeds draw
different pictures. The scorer does not care: the named colour stays the nearest palette colour, the
object stays in its cell.

Everything is generated from a seed with PIL (no download) and is deterministic. Some combinations
never appear in the training split, so that a model can be asked for them and shown to compose
what it learnt rather than recall it:

    HELD_OUT_OBJECTS   (colour, shape, position) triples never drawn in training, e.g. a red triangle
                       at the top left (red things, triangles and the top left are all seen)
    HELD_OUT_PAIRS     colour pairs never together in a two-object training scene (attribute binding:
                       "a red X and a blue Y" must put red on X, blue on Y)

The scorer is a nano counterpart of GenEval (Ghosh et al. 2023, the benchmark the Qwen-Image report
uses): from the pixels alone (no network), for each object of a caption, is there a blob of its
colour, of its shape, in its cell? Pixels are assigned to the nearest palette colour; blobs are
connected components; a blob's shape is read from how much of its bounding box it fills and where
its widest row is (circle ~ pi/4, square ~ 1, triangle ~ 1/2 widest at the bottom, diamond ~ 1/2
widest in the middle).

    render(scene, size) -> PIL image          caption(scene) -> str          parse_caption(str) -> scene
    cell_mask(position, size, grow) -> a PIL mask of one cell (what inpainting repaints)
    vary(scene, rng) -> the scene with a drawn size, offset and tint (render draws it; caption ignores it)
    make_scenes(n, seed, split) -> [Scene] (varied)   write_dataset(folder, n, seed) -> a folder train.py reads
    score(image, scene) -> per-object verdicts
    evaluate(images, scenes) -> accuracy by category (single object, two objects, colour, position,
                                shape, attribute binding)
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import images, writing

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 130, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}  # (row, column)
SIZES = {
    "small": 0.45,
    "large": 0.8,
}  # the object's side, as a fraction of a grid cell, undrawn (vary: below)
SIZE_RANGES = {"small": (0.4, 0.6), "large": (0.7, 0.9)}  # what `vary` draws from for each size word
COLOUR_JITTER = 12  # +- per RGB channel around the named colour: every palette pair stays > 90 apart
BACKGROUND = (245, 245, 240)
BACKGROUND_JITTER = 6

# Colours and a shape the scene grammar can say but the training split never shows: the VAE's test of
# generality (a brown star must come back brown), and the brown LoRA's new colour (checkpoints/nano_brown_lora).
NEW_COLOURS = {"brown": (140, 90, 40), "black": (30, 30, 30), "grey": (128, 128, 128)}
NEW_SHAPES = ("star",)
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}

HELD_OUT_OBJECTS = {
    ("red", "triangle", "top left"),
    ("blue", "circle", "bottom right"),
    ("green", "square", "center"),
    ("yellow", "diamond", "top right"),
    ("purple", "circle", "left"),
    ("orange", "triangle", "bottom"),
}
HELD_OUT_PAIRS = {
    frozenset(p) for p in (("red", "blue"), ("green", "yellow"), ("purple", "orange"), ("cyan", "pink"))
}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    position: str
    size: str = "large"
    # how this picture of it is drawn (vary); the defaults draw the canonical one: centred, SIZES, the named RGB
    side: float | None = None  # as a fraction of a cell
    offset: tuple = (0.0, 0.0)  # (dx, dy) of the centre, as fractions of a cell
    rgb: tuple | None = None


@dataclass(frozen=True)
class Scene:
    things: tuple  # one or two Things, in caption order
    background: tuple = BACKGROUND

    def named(self) -> Scene:
        """The scene as its caption states it, without the drawn variation (what a scorer compares)."""
        return Scene(tuple(Thing(t.colour, t.shape, t.position, t.size) for t in self.things))


# ---------------------------------------------------------------------------------------------
# Scenes <-> captions <-> pixels
# ---------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    def words(t: Thing) -> str:
        where = "in the center" if t.position == "center" else f"at the {t.position}"
        return f"a {t.size} {t.colour} {t.shape} {where}"

    return " and ".join(words(t) for t in scene.things)


CAPTION_PATTERN = re.compile(
    rf"an? (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{'|'.join(ALL_COLOURS)}) "
    rf"(?P<shape>{'|'.join(SHAPES + NEW_SHAPES)}) "
    rf"(?:in the center|at the (?P<position>{'|'.join(sorted(POSITIONS, key=len, reverse=True))}))"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption states (the inverse of `caption`; the size may be left out: large)."""
    parts = [p.strip() for p in text.strip().lower().split(" and ")]
    things = []
    for part in parts:
        m = CAPTION_PATTERN.fullmatch(part)
        if m is None:
            raise ValueError(
                f"not a scene caption: {part!r} (expected e.g. 'a small red circle at the top left')"
            )
        things.append(Thing(m["colour"], m["shape"], m["position"] or "center", m["size"] or "large"))
    return Scene(tuple(things))


def star(cx: float, cy: float, r: float) -> list:
    """A five-pointed star's ten corners (outer radius r, inner 0.45 r), pointing up."""
    corners = []
    for k in range(10):
        angle = math.pi * (k / 5 - 0.5)
        radius = r if k % 2 == 0 else 0.45 * r
        corners.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return corners


def render(scene: Scene, size: int = 128):
    """The scene as a size x size RGB PIL image: each object in its grid cell, drawn as `vary` drew it (a
    scene made by hand is drawn canonically: centred, at its size word's side, in the named colour)."""
    image = Image.new("RGB", (size, size), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for t in scene.things:
        row, col = POSITIONS[t.position]
        side = t.side if t.side is not None else SIZES[t.size]
        cx, cy = (col + 0.5 + t.offset[0]) * cell, (row + 0.5 + t.offset[1]) * cell
        r = side * cell / 2
        draw_shape(draw, t.shape, cx, cy, r, tuple(t.rgb) if t.rgb is not None else ALL_COLOURS[t.colour])
    return image


def cell_mask(position: str, size: int = 128, grow: int = 0):
    """A PIL "L" mask, white over the grid cell `position` (grown by `grow` pixels on each side), black
    elsewhere: what inpainting repaints."""
    row, col = POSITIONS[position]
    cell = size / 3
    box = [round(col * cell) - grow, round(row * cell) - grow, round((col + 1) * cell) + grow - 1]
    box.append(round((row + 1) * cell) + grow - 1)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(
        [max(0, v) for v in box[:2]] + [min(size - 1, v) for v in box[2:]], fill=255
    )
    return mask


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """One shape of SHAPES + NEW_SHAPES, centred at (cx, cy), inside the square of half-side r."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        draw.polygon(star(cx, cy, r), fill=fill)


def vary(scene: Scene, rng: random.Random) -> Scene:
    """One of the many pictures the caption admits: each object's side drawn from its size word's range, its
    centre moved inside its cell as far as keeps the whole object there (less one pixel's worth of margin),
    its colour moved by up to COLOUR_JITTER per channel; the background tinted by up to BACKGROUND_JITTER."""

    def channel(value: int, jitter: int) -> int:
        return min(255, max(0, value + rng.randint(-jitter, jitter)))

    things = []
    for t in scene.things:
        side = rng.uniform(*SIZE_RANGES[t.size])
        room = max(0.0, (1 - side) / 2 - 0.03)  # how far the centre may move, as a fraction of a cell
        offset = (rng.uniform(-room, room), rng.uniform(-room, room))
        rgb = tuple(channel(v, COLOUR_JITTER) for v in ALL_COLOURS[t.colour])
        things.append(Thing(t.colour, t.shape, t.position, t.size, side, offset, rgb))
    background = tuple(channel(v, BACKGROUND_JITTER) for v in BACKGROUND)
    return Scene(tuple(things), background)


def pictures_of(scene_list: list[Scene], size: int) -> torch.Tensor:
    """The scenes rendered, as one (N, 3, size, size) tensor in [-1, 1]: what the VAE trains on."""
    return torch.cat([images.to_tensor(render(s, size)) for s in scene_list])  # (N, 3, H, W)


def is_held_out(scene: Scene) -> bool:
    """Whether the training split may never contain this scene."""
    if any((t.colour, t.shape, t.position) in HELD_OUT_OBJECTS for t in scene.things):
        return True
    return len(scene.things) == 2 and frozenset(t.colour for t in scene.things) in HELD_OUT_PAIRS


def random_scene(rng: random.Random, objects: int) -> Scene:
    """One or two objects, in different cells and of different colours."""
    colours = rng.sample(sorted(COLOURS), objects)
    cells = rng.sample(sorted(POSITIONS), objects)
    return Scene(
        tuple(Thing(c, rng.choice(SHAPES), p, rng.choice(sorted(SIZES))) for c, p in zip(colours, cells))
    )


def make_scenes(
    n: int, seed: int = 0, split: str = "train", two_object_fraction: float = 0.5, varied: bool = True
) -> list[Scene]:
    """n scenes from `seed`: split="train" never holds a held-out combination; split="held_out" holds only
    them (single objects from HELD_OUT_OBJECTS, two-object scenes with a HELD_OUT_PAIRS colour pair). Each is
    `vary`'d (a picture of its own), unless varied=False (the canonical pictures)."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        objects = 2 if rng.random() < two_object_fraction else 1
        if split == "held_out" and objects == 1:
            colour, shape, position = rng.choice(sorted(HELD_OUT_OBJECTS))
            out.append(Scene((Thing(colour, shape, position, rng.choice(sorted(SIZES))),)))
            continue
        scene = random_scene(rng, objects)
        if split == "held_out":
            pair = sorted(rng.choice(sorted(HELD_OUT_PAIRS, key=sorted)))
            rng.shuffle(pair)
            scene = Scene(tuple(Thing(c, t.shape, t.position, t.size) for c, t in zip(pair, scene.things)))
            if any((t.colour, t.shape, t.position) in HELD_OUT_OBJECTS for t in scene.things):
                continue  # keep each held-out test about one thing
        if is_held_out(scene) == (split == "held_out"):
            out.append(scene)
    return [vary(s, rng) for s in out] if varied else out


def outside_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n varied scenes the training split never shows, each with at least one object in a NEW_COLOURS colour
    or a star: what the VAE's generality is measured on (a VAE that only saw the palette draws brown as
    orange)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng, 1 + i % 2)
        first = scene.things[0]
        if i % 3 == 2:  # a star in a scene colour
            first = Thing(first.colour, "star", first.position, first.size)
        else:
            first = Thing(rng.choice(sorted(NEW_COLOURS)), rng.choice(SHAPES + NEW_SHAPES), first.position)
        out.append(vary(Scene((first,) + scene.things[1:]), rng))
    return out


def write_dataset(folder, n: int, seed: int = 0, split: str = "train", size: int = 128) -> list[Scene]:
    """n scenes as a training folder (scene-00000.png + scene-00000.txt, ...), the layout `train.py` reads."""
    folder = Path(folder)
    writing.check_writable_folder(folder, f"cannot write the scenes to {folder}")
    made = make_scenes(n, seed, split)
    for i, scene in enumerate(made):
        images.save_image(render(scene, size), folder / f"scene-{i:05d}.png")
        with writing.atomic_write(folder / f"scene-{i:05d}.txt", "w") as f:
            f.write(caption(scene) + "\n")
    return made


# ---------------------------------------------------------------------------------------------
# Reading a scene back from pixels
# ---------------------------------------------------------------------------------------------


def colour_map(image) -> np.ndarray:
    """(H, W) index of the nearest palette colour per pixel: 0 = background, i + 1 = ALL_COLOURS' i-th (the
    scenes' eight, then NEW_COLOURS: an orange drawn brownish is not orange); -1 = far from every one (more
    than 120 in RGB distance)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    palette = np.array([BACKGROUND, *ALL_COLOURS.values()], dtype=np.float32)  # (1 + colours, 3)
    distance = np.linalg.norm(pixels[:, :, None] - palette[None, None], axis=-1)  # (H, W, 1 + colours)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > 120] = -1
    return nearest


def blobs(mask: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """Connected components (4-neighbour) of a boolean mask, as boolean masks, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    H, W = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, members = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            members.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(members) >= min_pixels:
            blob = np.zeros_like(mask, dtype=bool)
            ys, xs = zip(*members)
            blob[list(ys), list(xs)] = True
            out.append(blob)
    return sorted(out, key=lambda b: -b.sum())


def blob_shape(blob: np.ndarray) -> str:
    """circle / square / triangle / diamond from the fill of the bounding box and where the widest row is."""
    ys, xs = np.nonzero(blob)
    box = blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]  # (h, w)
    rows = [np.nonzero(r)[0] for r in box]
    widths = np.array(
        [r[-1] - r[0] + 1 if len(r) else 0 for r in rows], dtype=np.float64
    )  # spans: holes don't count
    fill = widths.sum() / box.size
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    smooth = np.convolve(widths, np.ones(3) / 3, mode="same")
    widest = (np.argmax(smooth) + 0.5) / len(widths)  # 0 = top row, 1 = bottom row
    return "triangle" if widest > 0.68 else "diamond"


def blob_position(blob: np.ndarray) -> str:
    """The grid cell of the blob's centroid."""
    ys, xs = np.nonzero(blob)
    H, W = blob.shape
    cell = (min(2, int(3 * ys.mean() / H)), min(2, int(3 * xs.mean() / W)))
    return next(name for name, rc in POSITIONS.items() if rc == cell)


def score(image, scene: Scene) -> list[dict]:
    """For each object of the scene: {"present", "colour", "shape", "position", "correct"} read from the
    pixels. "colour" means a blob of the stated colour exists; the largest such blob is then judged for
    shape and position (so a right shape in the wrong colour counts as wrong: attribute binding)."""
    labels = colour_map(image)
    min_pixels = max(4, labels.size // 400)  # ignore specks (0.25% of the image)
    verdicts = []
    for t in scene.things:
        found = blobs(labels == list(ALL_COLOURS).index(t.colour) + 1, min_pixels)
        v = {"present": bool(found), "colour": bool(found), "shape": False, "position": False}
        if found:
            v["shape"] = blob_shape(found[0]) == t.shape
            v["position"] = blob_position(found[0]) == t.position
        v["correct"] = v["colour"] and v["shape"] and v["position"]
        verdicts.append(v)
    return verdicts


def evaluate(images, scenes) -> dict:
    """Accuracy by category, as fractions (GenEval's categories, at nano scale):
    single_object  one-object scenes whose object is entirely right
    single_colour, single_shape, single_position   one-object scenes: that attribute right
    two_objects    two-object scenes with both objects entirely right
    colour, shape, position   over every object: that attribute right (shape/position of its colour's blob)
    binding        two-object scenes: both objects' colour *and* shape right (the colours on the right shapes)"""
    keys = (
        "single_object",
        "single_colour",
        "single_shape",
        "single_position",
        "two_objects",
        "colour",
        "shape",
        "position",
        "binding",
    )
    counts = {k: [0, 0] for k in keys}

    def add(key, ok):
        counts[key][0] += bool(ok)
        counts[key][1] += 1

    for image, scene in zip(images, scenes, strict=True):
        verdicts = score(image, scene)
        for v in verdicts:
            for attribute in ("colour", "shape", "position"):
                add(attribute, v[attribute])
                if len(verdicts) == 1:
                    add(f"single_{attribute}", v[attribute])
        if len(verdicts) == 1:
            add("single_object", verdicts[0]["correct"])
        else:
            add("two_objects", all(v["correct"] for v in verdicts))
            add("binding", all(v["colour"] and v["shape"] for v in verdicts))
    return {k: (hit / total if total else float("nan")) for k, (hit, total) in counts.items()}

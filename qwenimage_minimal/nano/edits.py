"""Edit pairs from scenes, and a scorer that reads an edit back from pixels: the data and the yardstick of the
nano Edit model (edit_recipe.py).

An edit is a source scene, an instruction and the target scene. Five kinds, one grammar:

    recolour   "change the red circle to blue"
    move       "move the red circle to the bottom left"
    reshape    "turn the red circle into a square"
    add        "add a small green triangle at the top right"
    remove     "remove the red circle"

An object is named by its colour and shape ("the red circle"): a scene's objects have different colours, so
the name is unique. Every object the instruction does not name is drawn in the target exactly as in the
source (the same size, offset and tint: `vary`'s draw is kept), and the moved, recoloured or reshaped object
keeps what the instruction does not change. So the model must copy the source where it is told nothing, which
is what Qwen-Image-Edit's reference latents are for.

Held out of training, so that the model is measured on edits it never saw:

    HELD_OUT_KINDS      (kind, colour) pairs: e.g. no purple object is ever moved in training, though purple
                        objects and moves are both seen (the colour: the named object's; for add the new
                        object's; for recolour the new colour, so ("recolour", "cyan") is recolouring *to* cyan)
    HELD_OUT_RECOLOURS  (from, to) colour pairs never recoloured in training, e.g. red to blue

    make_edits(n, seed, split) -> [Edit]      instruction(edit) -> str
    judge(picture, edit) -> {"done", "kept"}  evaluate(pictures, edits) -> the shares per kind
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from . import scenes

KINDS = ("recolour", "move", "reshape", "add", "remove")
HELD_OUT_KINDS = {
    ("recolour", "cyan"),
    ("move", "purple"),
    ("reshape", "orange"),
    ("add", "pink"),
    ("remove", "yellow"),
}
HELD_OUT_RECOLOURS = {("red", "blue"), ("green", "yellow"), ("blue", "orange")}


@dataclass(frozen=True)
class Edit:
    kind: str
    source: scenes.Scene
    target: scenes.Scene
    thing: scenes.Thing  # the object the instruction names, as it is in the source (add: the new one)
    changed: scenes.Thing | None  # the object as it is in the target (remove: None)

    def key_colour(self) -> str:
        """The colour HELD_OUT_KINDS speaks of: recolour's new colour, the named object's otherwise."""
        return self.changed.colour if self.kind == "recolour" else self.thing.colour


def instruction(edit: Edit) -> str:
    t, c = edit.thing, edit.changed
    if edit.kind == "recolour":
        return f"change the {t.colour} {t.shape} to {c.colour}"
    if edit.kind == "move":
        where = "the center" if c.position == "center" else f"the {c.position}"
        return f"move the {t.colour} {t.shape} to {where}"
    if edit.kind == "reshape":
        return f"turn the {t.colour} {t.shape} into a {c.shape}"
    if edit.kind == "add":
        where = "in the center" if c.position == "center" else f"at the {c.position}"
        return f"add a {c.size} {c.colour} {c.shape} {where}"
    return f"remove the {t.colour} {t.shape}"


def is_held_out(edit: Edit) -> bool:
    if (edit.kind, edit.key_colour()) in HELD_OUT_KINDS:
        return True
    return edit.kind == "recolour" and (edit.thing.colour, edit.changed.colour) in HELD_OUT_RECOLOURS


def random_edit(rng: random.Random, kind: str) -> Edit:
    """One edit of `kind` on a varied training-split scene of one or two objects (add: one, so that the result
    has at most two). Only the source is kept out of scenes.is_held_out's combinations: a target may hold one
    (a move may make a text-to-image held-out object), which does not matter to the edit's scores."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    while True:
        objects = 1 if kind == "add" or rng.random() < 0.5 else 2
        source = scenes.vary(scenes.random_scene(rng, objects), rng)
        if scenes.is_held_out(source):
            continue
        used_colours = {t.colour for t in source.things}
        free_cells = sorted(set(scenes.POSITIONS) - {t.position for t in source.things})
        if kind == "add":
            colour = rng.choice(sorted(set(scenes.COLOURS) - used_colours))
            new = scenes.Thing(
                colour, rng.choice(scenes.SHAPES), rng.choice(free_cells), rng.choice(sorted(scenes.SIZES))
            )
            drawn = scenes.vary(scenes.Scene((new,)), rng).things[0]
            target = scenes.Scene(source.things + (drawn,), source.background)
            return Edit(kind, source, target, drawn, drawn)
        index = rng.randrange(len(source.things))
        t = source.things[index]
        if kind == "recolour":
            colour = rng.choice(sorted(set(scenes.COLOURS) - used_colours))
            rgb = scenes.vary(scenes.Scene((replace(t, colour=colour),)), rng).things[0].rgb
            changed = replace(t, colour=colour, rgb=rgb)
        elif kind == "move":
            changed = replace(t, position=rng.choice(free_cells))
        elif kind == "reshape":
            changed = replace(t, shape=rng.choice([s for s in scenes.SHAPES if s != t.shape]))
        else:
            changed = None
        things = tuple(
            changed if i == index else o for i, o in enumerate(source.things) if i != index or changed
        )
        return Edit(kind, source, scenes.Scene(things, source.background), t, changed)


def make_edits(n: int, seed: int = 0, split: str = "train", kinds=KINDS) -> list[Edit]:
    """n edits from `seed`, the kinds in turn: split="train" never holds a held-out edit, "held_out" only them."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    if isinstance(kinds, str) or not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty sequence of {KINDS}, got {kinds!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        for _ in range(10_000):
            edit = random_edit(rng, kind)
            if is_held_out(edit) == (split == "held_out"):
                out.append(edit)
                break
        else:
            raise RuntimeError(f"no {split} edit of kind {kind!r} found")
    return out


# ---------------------------------------------------------------------------------------------
# Reading an edit back from pixels
# ---------------------------------------------------------------------------------------------


def found(labels: np.ndarray, colour: str) -> list[np.ndarray]:
    """The blobs of one colour (scenes.score's rule: specks below 0.25% of the image ignored), largest first."""
    min_pixels = max(4, labels.size // 400)
    return scenes.blobs(labels == list(scenes.ALL_COLOURS).index(colour) + 1, min_pixels)


def right(labels: np.ndarray, thing: scenes.Thing) -> bool:
    """Exactly one blob of the thing's colour, of its shape, in its cell."""
    blobs = found(labels, thing.colour)
    return (
        len(blobs) == 1
        and scenes.blob_shape(blobs[0]) == thing.shape
        and scenes.blob_position(blobs[0]) == thing.position
    )


def judge(picture, edit: Edit) -> dict:
    """{"done": the instruction carried out, "kept": every object it did not name still as it was (colour,
    shape, cell)}, read from the edited picture's pixels:
        recolour, move, reshape, add   the changed object right (one blob of its colour, its shape, its cell);
                                       recolour also: no blob of the old colour left
        remove                         no blob of the removed object's colour"""
    labels = scenes.colour_map(picture)
    if edit.kind == "remove":
        done = not found(labels, edit.thing.colour)
    else:
        done = right(labels, edit.changed)
        if edit.kind == "recolour":
            done = done and not found(labels, edit.thing.colour)
    others = [t for t in edit.target.things if edit.changed is None or t.colour != edit.changed.colour]
    kept = all(right(labels, t) for t in others)
    return {"done": bool(done), "kept": bool(kept)}


def evaluate(pictures, edits) -> dict:
    """-> {kind: {"done", "kept", "n", "n_kept"}} and "all": the shares of edits carried out, and of edits whose
    unnamed objects were all kept (over the n_kept edits that have any; 1.0 when none has)."""
    judged = [(judge(p, e), e) for p, e in zip(pictures, edits, strict=True)]
    rows = {}
    for kind in (*KINDS, "all"):
        mine = [(v, e) for v, e in judged if kind in ("all", e.kind)]
        if not mine:
            continue
        with_others = [v for v, e in mine if len(e.target.things) > (e.kind != "remove")]
        rows[kind] = {
            "done": float(np.mean([v["done"] for v, _ in mine])),
            "kept": float(np.mean([v["kept"] for v in with_others])) if with_others else 1.0,
            "n": len(mine),
            "n_kept": len(with_others),  # the edits that leave an object unnamed: kept's denominator
        }
    return rows

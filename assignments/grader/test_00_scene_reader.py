"""Lesson 00's assignment (assignments/scene_reader.py): the scorer that reads scenes back from pixels, against the
package's (qwenimage_minimal.nano.scenes) on rendered scenes, true captions and wrong ones."""

import dataclasses

import numpy as np
import torch
from PIL import Image

from conftest import check, load
from qwenimage_minimal.nano import scenes

reader = load("scene_reader")
KEYS = ("present", "colour", "shape", "position", "correct")
SCENES = (
    scenes.make_scenes(6, seed=5)  # varied: drawn sizes, offsets, shades
    + scenes.make_scenes(4, seed=6, split="held_out")
    + scenes.outside_scenes(3, seed=7)  # brown, black, grey, stars
)
PICTURES = [scenes.render(s, 128) for s in SCENES]


def labels_with(image, palette, squared=False, threshold=True) -> torch.Tensor:
    """colour_map as a typical mistake computes it: another palette, the squared distance against 120, or
    no threshold at all (every pixel gets its nearest palette colour)."""
    pixels = np.asarray(image, dtype=np.float64)[:, :, None]
    distance = ((pixels - np.array(palette, dtype=np.float64)) ** 2).sum(-1) ** (1 if squared else 0.5)
    labels = distance.argmin(-1)
    if threshold:
        labels[distance.min(-1) > 120] = -1
    return torch.from_numpy(labels)


def test_colour_map_matches_the_package():
    far = PICTURES[0].copy()
    far.paste((128, 255, 0), (0, 0, 20, 20))  # a colour no scene has: -1
    pictures = PICTURES + [far]
    expected = torch.stack([torch.from_numpy(scenes.colour_map(p)).long() for p in pictures])
    got = torch.stack([torch.as_tensor(np.asarray(reader.colour_map(p))).long() for p in pictures])
    palette = [scenes.BACKGROUND, *scenes.ALL_COLOURS.values()]
    check(
        "colour_map on rendered scenes (N, H, W)",
        got,
        expected,
        mistakes=[
            (
                torch.stack([labels_with(p, palette, squared=True) for p in pictures]),
                "the squared distance was compared with 120: the threshold is on the distance itself "
                "(a shaded colour is ~20 from its palette colour, ~400 squared)",
            ),
            (
                torch.stack([labels_with(p, palette[: 1 + len(scenes.COLOURS)]) for p in pictures]),
                "the palette holds only the eight scene colours: ALL_COLOURS adds brown, black and grey, "
                "so that a brown object is not read as orange",
            ),
            (
                torch.stack([labels_with(p, palette, threshold=False) for p in pictures]),
                "no pixel is -1: one farther than 120 from every palette colour is -1",
            ),
        ],
        atol=0,
        rtol=0,
    )


def shape_index(names) -> torch.Tensor:
    return torch.tensor([scenes.SHAPES.index(n) if n in scenes.SHAPES else -1 for n in names]).float()


def shape_uncropped(blob) -> str:
    """blob_shape's rule as a typical mistake applies it: to the whole picture, not the blob's bounding box."""
    spans = np.array([row.nonzero()[0][-1] - row.nonzero()[0][0] + 1 if row.any() else 0 for row in blob])
    fill = spans.sum() / blob.size  # over the whole picture, of which a blob fills little
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    widest = (np.argmax(np.convolve(spans, np.ones(3) / 3, mode="same")) + 0.5) / len(spans)
    return "triangle" if widest > 0.68 else "diamond"


def test_blob_shape_matches_the_package():
    blobs = []
    for picture, scene in zip(PICTURES, SCENES):
        labels = scenes.colour_map(picture)
        for t in scene.things:
            blobs += scenes.blobs(labels == list(scenes.ALL_COLOURS).index(t.colour) + 1, 40)[:1]
    flipped = [b[::-1] for b in blobs]  # upside down: a triangle widest at the top is a diamond
    expected = shape_index(scenes.blob_shape(b) for b in blobs + flipped)
    check(
        f"blob_shape on {len(blobs)} blobs and their upside-down copies (indices into scenes.SHAPES)",
        shape_index(reader.blob_shape(b) for b in blobs + flipped),
        expected,
        mistakes=[
            (
                shape_index(scenes.blob_shape(b) for b in flipped + blobs),
                "triangles and diamonds are told apart upside down: the place of the widest row counts "
                "from the top, (row + 0.5) / h, and a triangle is widest at the bottom (> 0.68)",
            ),
            (
                shape_index(shape_uncropped(b) for b in blobs + flipped),
                "the fill is over the blob's bounding box, not the whole picture (nor is the widest row's "
                "place counted in the picture's height): crop the blob to its bounding box first",
            ),
        ],
        atol=0,
        rtol=0,
    )


def verdicts(read, cases) -> torch.Tensor:
    """(cases, 5): each case's verdict as 0 / 1 in the order of KEYS."""
    return torch.tensor([[float(read(p, t)[k]) for k in KEYS] for p, t in cases])


def package_read(image, thing):
    return scenes.score(image, scenes.Scene((thing,)))[0]


def read_with(image, thing, any_colour=False, min_pixels=None):
    """A typical mistake's reading: the blob judged of any colour, or specks kept (min_pixels=1)."""
    labels = scenes.colour_map(image)
    smallest = max(4, labels.size // 400) if min_pixels is None else min_pixels
    found = scenes.blobs(labels == list(scenes.ALL_COLOURS).index(thing.colour) + 1, smallest)
    judged = scenes.blobs(labels > 0, smallest) if any_colour else found
    verdict = {"present": bool(found), "colour": bool(found), "shape": False, "position": False}
    if found:
        verdict["shape"] = scenes.blob_shape(judged[0]) == thing.shape
        verdict["position"] = scenes.blob_position(judged[0]) == thing.position
    verdict["correct"] = verdict["colour"] and verdict["shape"] and verdict["position"]
    return verdict


MISTAKES = [
    (
        lambda image, thing: read_with(image, thing, any_colour=True),
        "the shape or the cell was read from a blob of another colour: judge only the largest blob of the "
        "stated colour, or a red circle and a blue square pass for a blue circle and a red square",
    ),
    (
        lambda image, thing: read_with(image, thing, min_pixels=1),
        "a speck counted as an object: ignore blobs under max(4, H * W // 400) pixels",
    ),
]


def graded(what, cases):
    got, expected = verdicts(reader.read_object, cases), verdicts(package_read, cases)
    if not torch.equal(got, expected):  # the mistakes are worked out only for a wrong answer (they are slow)
        check(what, got, expected, [(verdicts(read, cases), hint) for read, hint in MISTAKES], atol=0, rtol=0)


def test_read_object_on_the_true_captions():
    cases = [(p, t) for p, s in zip(PICTURES, SCENES) for t in s.named().things]
    graded(f"read_object on {len(cases)} objects of their own pictures (case, {'/'.join(KEYS)})", cases)


def test_read_object_says_no_to_wrong_captions():
    cases = []
    for picture, scene in zip(PICTURES[::2], SCENES[::2]):
        t = scene.named().things[0]
        unused = next(c for c in scenes.COLOURS if c not in {u.colour for u in scene.things})
        cases += [
            (picture, dataclasses.replace(t, colour=unused)),  # a colour the picture does not have
            (picture, dataclasses.replace(t, shape=next(s for s in scenes.SHAPES if s != t.shape))),
            (picture, dataclasses.replace(t, position=next(p for p in scenes.POSITIONS if p != t.position))),
        ]
    swapped = scenes.render(
        scenes.parse_caption("a large blue circle at the left and a large red square at the right")
    )
    cases += [
        (swapped, t)
        for t in scenes.parse_caption("a large red circle at the left and a blue square at the right").things
    ]
    graded(f"read_object on {len(cases)} wrong captions (case, {'/'.join(KEYS)})", cases)


def test_a_speck_is_not_an_object():
    image = Image.new("RGB", (128, 128), scenes.BACKGROUND)
    image.paste(scenes.COLOURS["red"], (60, 60, 66, 66))  # 36 pixels, under 128 * 128 // 400 = 40
    image.paste(scenes.COLOURS["blue"], (10, 10, 40, 40))  # a large blue square at the top left
    cases = [(image, scenes.parse_caption("a small red square in the center").things[0])]
    cases += [(image, scenes.parse_caption("a large blue square at the top left").things[0])]
    graded("read_object on a red speck and a blue square (case, " + "/".join(KEYS) + ")", cases)

"""nano/scenes.py: the nano model's synthetic data (deterministic, held-out combinations kept out of training)
and the pixel scorer (right on ground truth, robust to blur and noise, and able to say no)."""

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from qwenimage_minimal.nano import scenes


def test_generation_is_deterministic_and_captions_round_trip():
    a, b = scenes.make_scenes(50, seed=7), scenes.make_scenes(50, seed=7)
    assert a == b and a != scenes.make_scenes(50, seed=8)
    assert scenes.render(a[0]).tobytes() == scenes.render(b[0]).tobytes()
    for s in a + scenes.make_scenes(50, seed=7, split="held_out"):
        assert scenes.parse_caption(scenes.caption(s)) == s.named()
    assert [s.named() for s in a] == scenes.make_scenes(50, seed=7, varied=False)
    assert (
        scenes.caption(scenes.Scene((scenes.Thing("red", "circle", "center", "small"),)))
        == "a small red circle in the center"
    )
    assert scenes.parse_caption("A red triangle at the top left") == scenes.Scene(
        (scenes.Thing("red", "triangle", "top left", "large"),)
    )
    with pytest.raises(ValueError, match="not a scene caption: 'a red dog at the top'"):
        scenes.parse_caption("a red dog at the top")


def test_each_caption_has_many_pictures_all_inside_the_named_cell():
    """vary: the same caption drawn 64 times differs in place, size, colour and background, and every object
    stays whole inside its grid cell, with its named colour the nearest palette colour."""
    import math

    cell = 128 / 3
    for text in ("a small red circle at the top left", "a large blue square in the center"):
        scene = scenes.parse_caption(text)
        drawn = [scenes.vary(scene, random.Random(k)) for k in range(64)]
        assert len({d.things[0].offset for d in drawn}) == 64 and len({d.background for d in drawn}) > 1
        t0 = scene.things[0]
        row, col = scenes.POSITIONS[t0.position]
        for d in drawn:
            t = d.things[0]
            low, high = scenes.SIZE_RANGES[t.size]
            assert low <= t.side <= high
            r = t.side / 2
            for centre, index in ((t.offset[0], col), (t.offset[1], row)):  # inside the cell, in cell units
                assert index <= index + 0.5 + centre - r and index + 0.5 + centre + r <= index + 1
            named = scenes.COLOURS[t.colour]
            assert max(abs(a - b) for a, b in zip(t.rgb, named)) <= scenes.COLOUR_JITTER
            nearest = min(scenes.ALL_COLOURS, key=lambda c: math.dist(scenes.ALL_COLOURS[c], t.rgb))
            assert nearest == t.colour
        offsets = np.array([d.things[0].offset for d in drawn]) * cell
        small = "small" in text
        assert (offsets.max() - offsets.min() > 15) if small else (offsets.max() - offsets.min() > 4)
    canonical = scenes.render(scenes.parse_caption("a small red circle at the top left"))
    assert canonical.getpixel((21, 21)) == scenes.COLOURS["red"]  # a hand-made scene: centred, named RGB


def test_held_out_combinations_never_appear_in_training_but_their_parts_do():
    train = scenes.make_scenes(3000, seed=0)
    held = scenes.make_scenes(300, seed=0, split="held_out")
    assert not any(scenes.is_held_out(s) for s in train) and all(scenes.is_held_out(s) for s in held)
    seen_colour_shape = {(t.colour, t.shape) for s in train for t in s.things}
    seen_shape_position = {(t.shape, t.position) for s in train for t in s.things}
    seen_colour_position = {(t.colour, t.position) for s in train for t in s.things}
    for colour, shape, position in scenes.HELD_OUT_OBJECTS:  # each pair of its parts was seen
        assert (colour, shape) in seen_colour_shape and (shape, position) in seen_shape_position
        assert (colour, position) in seen_colour_position
    pairs_in_training = {frozenset(t.colour for t in s.things) for s in train if len(s.things) == 2}
    assert not pairs_in_training & scenes.HELD_OUT_PAIRS
    colours_in_training = {t.colour for s in train for t in s.things}
    assert all(pair <= colours_in_training for pair in scenes.HELD_OUT_PAIRS)
    fraction_two = sum(len(s.things) == 2 for s in train) / len(train)
    assert 0.45 < fraction_two < 0.55
    with pytest.raises(ValueError, match="split must be"):
        scenes.make_scenes(1, split="test")


def noisy(image, blur, noise, rng):
    image = image.filter(ImageFilter.GaussianBlur(blur)) if blur else image
    a = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (image.height, image.width, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def test_the_scorer_reads_ground_truth_right_even_blurred_and_noisy():
    sc = scenes.make_scenes(150, seed=3) + scenes.make_scenes(60, seed=4, split="held_out")
    clean = scenes.evaluate([scenes.render(s, 128) for s in sc], sc)
    assert all(v >= 0.98 for v in clean.values()), clean  # the scorer is not the bottleneck
    rng = np.random.default_rng(0)
    rough = scenes.evaluate([noisy(scenes.render(s, 128), 1.0, 8, rng) for s in sc], sc)
    assert all(v >= 0.93 for v in rough.values()), rough


def test_the_scorer_says_no_to_wrong_captions():
    sc = [s for s in scenes.make_scenes(200, seed=5) if len(s.things) == 2][:60]
    pictures = [scenes.render(s) for s in sc]
    rng = random.Random(0)

    def change(s, **field):
        t = s.things[0]
        return scenes.Scene((scenes.Thing(**{**t.__dict__, **field}),) + s.things[1:])

    other_shape = [
        change(s, shape=rng.choice([x for x in scenes.SHAPES if x != s.things[0].shape])) for s in sc
    ]
    other_place = [
        change(
            s, position=rng.choice([p for p in scenes.POSITIONS if p not in {t.position for t in s.things}])
        )
        for s in sc
    ]
    absent = [
        change(s, colour=next(c for c in scenes.COLOURS if c not in {t.colour for t in s.things})) for s in sc
    ]
    assert scenes.evaluate(pictures, other_shape)["two_objects"] == 0.0
    assert scenes.evaluate(pictures, other_place)["two_objects"] == 0.0
    assert scenes.evaluate(pictures, absent)["colour"] == 0.5  # one object of the two is missing
    # Colours swapped between the two objects: both colours are there, but on the wrong shapes and places.
    swapped = [
        scenes.Scene(
            (
                scenes.Thing(b.colour, a.shape, a.position, a.size),
                scenes.Thing(a.colour, b.shape, b.position, b.size),
            )
        )
        for a, b in (s.things for s in sc)
    ]
    result = scenes.evaluate(pictures, swapped)
    assert result["colour"] == 1.0 and result["position"] == 0.0 and result["two_objects"] == 0.0
    same_shapes = sum(a.shape == b.shape for a, b in (s.things for s in sc)) / len(sc)
    assert result["binding"] == pytest.approx(same_shapes)  # binding is only right by chance
    blank = Image.new("RGB", (128, 128), scenes.BACKGROUND)
    assert scenes.evaluate([blank] * 3, sc[:3])["colour"] == 0.0


def test_a_written_dataset_is_what_the_training_loop_reads(tmp_path):
    from qwenimage_minimal import train_data

    made = scenes.write_dataset(tmp_path / "data", 6, seed=2)
    examples = train_data.read_examples(tmp_path / "data")
    assert [scenes.parse_caption(e.prompt) for e in examples] == [s.named() for s in made]
    picture = Image.open(examples[0].image)
    assert picture.size == (128, 128) and scenes.evaluate([picture], made[:1])["colour"] == 1.0

"""Lesson 06's assignment (assignments/edit_positions.py): the positions of an Edit sequence, against the
package (qwenimage_minimal.mmdit.image_positions / text_positions / rope_tables) and diffusers' QwenEmbedRope."""

import pytest
import torch

from conftest import check, load
from qwenimage_minimal import mmdit

positions = load("edit_positions")
CONFIG = mmdit.MMDiTConfig()  # axes (16, 56, 56), theta 10000: the official model's
SHAPES = [
    [(1, 4, 6)],  # text-to-image: one image
    [(1, 3, 4), (1, 9, 5)],  # an edit whose reference is taller than the output: it sets the text start
    [(1, 5, 7), (1, 4, 4), (1, 7, 3)],  # two references, odd sizes
]


def grid(f, h, w, frame, rows, cols):
    """(f * h * w, 3) row-major positions from a first frame and the rows' and columns' values."""
    g = torch.meshgrid(torch.arange(frame, frame + f).float(), rows.float(), cols.float(), indexing="ij")
    return torch.stack(g, dim=-1).reshape(-1, 3)


def image_mistakes(img_shapes):
    """(img_pos, hint) of each typical mistake."""
    as_grids = lambda frame, rows: torch.cat(
        [grid(f, h, w, frame(i), rows(h), rows(w)) for i, (f, h, w) in enumerate(img_shapes)]
    )
    return [
        (
            as_grids(lambda i: 0, lambda n: torch.arange(-(n - n // 2), n // 2)),
            "every image is on frame 0: image i (0 = the noise, 1, 2, ... = references) is on frame i",
        ),
        (
            as_grids(lambda i: i, lambda n: torch.arange(n)),
            "rows and columns count from 0: they are centred, -(h - h // 2) .. h // 2 - 1",
        ),
        (
            as_grids(lambda i: i, lambda n: torch.arange(-(n // 2), n - n // 2)),
            "an odd number of rows or columns is centred the wrong way: h = 5 gives -3 .. 1, not -2 .. 2",
        ),
    ]


def text_mistakes(img_shapes, text_len):
    text = lambda s: mmdit.text_positions(text_len, s)
    f, h, w = img_shapes[0]
    return [
        (
            text(0),
            "the text starts at 0, on top of the images' centred positions: start at max(h // 2, w // 2)",
        ),
        (
            text(max(h // 2, w // 2)),
            "the text starts after the first image only: take the max over all images",
        ),
        (
            text(max(max(h, w) for _, h, w in img_shapes)),
            "the text starts at max(h, w): the grids are centred, so max(h // 2, w // 2) is already past them",
        ),
    ]


@pytest.mark.parametrize("img_shapes", SHAPES)
def test_image_positions_match_the_package(img_shapes):
    img_pos, _ = positions.edit_positions(img_shapes, 5)
    expected = torch.cat([mmdit.image_positions(f, h, w, i) for i, (f, h, w) in enumerate(img_shapes)])
    check(f"img_pos for img_shapes {img_shapes}", img_pos, expected, image_mistakes(img_shapes))


@pytest.mark.parametrize("img_shapes", SHAPES)
def test_the_rope_tables_match_the_package(img_shapes):
    img_pos, txt_pos = positions.edit_positions(img_shapes, 7)
    img_table, txt_table = mmdit.rope_tables(img_shapes, 7, CONFIG)
    table = lambda p: mmdit.rope_table(p, CONFIG.axes_dims_rope, CONFIG.rope_theta)
    mistakes = [(table(p), hint) for p, hint in text_mistakes(img_shapes, 7)]
    check(f"the text's RoPE table from txt_pos, img_shapes {img_shapes}", table(txt_pos), txt_table, mistakes)
    check(f"the images' RoPE table from img_pos, img_shapes {img_shapes}", table(img_pos), img_table)


def test_text_positions_are_one_dimensional():
    _, txt_pos = positions.edit_positions([(1, 4, 6), (1, 6, 2)], 4)
    check("txt_pos", txt_pos, torch.tensor([[3.0] * 3, [4.0] * 3, [5.0] * 3, [6.0] * 3]))


def test_no_text_position_is_an_image_position():
    img_pos, txt_pos = positions.edit_positions(SHAPES[2], 30)
    shared = (txt_pos[:, None, 1:] == img_pos[None, :, 1:]).all(-1).any().item()
    assert not shared, "a text token shares its (row, column) with an image token: start the text later"


@pytest.mark.parametrize("img_shapes", [SHAPES[1], SHAPES[2], [(2, 3, 4), (1, 5, 5)]])  # and a 2-frame video
def test_matches_diffusers(img_shapes):
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=list(CONFIG.axes_dims_rope), scale_rope=True)
    img_table, txt_table = rope([img_shapes], device=torch.device("cpu"), max_txt_seq_len=6)
    img_pos, txt_pos = positions.edit_positions(img_shapes, 6)
    table = lambda p: mmdit.rope_table(p, CONFIG.axes_dims_rope, CONFIG.rope_theta)
    check(f"RoPE of img_pos against diffusers' QwenEmbedRope, {img_shapes}", table(img_pos), img_table)
    check(f"RoPE of txt_pos against diffusers' QwenEmbedRope, {img_shapes}", table(txt_pos), txt_table)

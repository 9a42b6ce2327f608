"""Lesson 02's assignment (assignments/rope.py): the RoPE table and its application, against the package
(qwenimage_minimal.mmdit) and diffusers' apply_rotary_emb_qwen."""

import pytest
import torch

from conftest import check, load
from qwenimage_minimal import mmdit

rope = load("rope")
g = torch.Generator().manual_seed(0)


def positions(n: int) -> torch.Tensor:
    """(n, 3) positions as the MMDiT gives them: frames, and rows / columns centred (negative ones too)."""
    return torch.randint(-20, 21, (n, 3), generator=g).float()


@pytest.mark.parametrize("axes_dims", [(16, 56, 56), (8, 12, 12)])
def test_the_table_has_one_frequency_ladder_per_axis(axes_dims):
    pos = positions(37)
    expected = mmdit.rope_table(pos, axes_dims, 10000.0)
    dim = sum(axes_dims)  # the mistake: one ladder 1 / theta ** (2k / dim) over the whole head
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    axis = torch.cat([torch.full((d // 2,), a) for a, d in enumerate(axes_dims)])  # each pair's axis
    single = torch.polar(torch.ones(37, dim // 2), pos[:, axis] * inv)
    check(
        f"rope_table(positions, {axes_dims}, 10000)",
        rope.rope_table(pos, axes_dims, 10000.0),
        expected,
        mistakes=[
            (
                single,
                "one frequency ladder over the whole head: each axis needs its own, "
                "1 / theta ** (2k / axes_dims[a]) with k counting from 0 inside that axis",
            ),
            (expected.conj(), "the angles have the wrong sign: e^{+i angle}, not e^{-i angle}"),
        ],
    )


def test_the_table_at_position_zero_is_one():
    table = rope.rope_table(torch.zeros(3, 3), (16, 56, 56), 10000.0)
    check("rope_table at position (0, 0, 0)", table, torch.ones(3, 64, dtype=torch.complex64))


def halves_swapped(x, rotations):
    half = x.shape[-1] // 2
    out = torch.complex(x[..., :half].float(), x[..., half:].float()) * rotations[:, None, :]
    return torch.cat([out.real, out.imag], dim=-1).type_as(x)


@pytest.mark.parametrize("shape", [(2, 7, 3, 32), (1, 5, 1, 64)])  # odd sequence lengths, batch > 1
def test_apply_rope_matches_the_package(shape):
    x = torch.randn(*shape, generator=g)
    rotations = mmdit.rope_table(
        positions(shape[1]), (16, 24, 24) if shape[-1] == 64 else (8, 12, 12), 10000.0
    )
    expected = mmdit.apply_rope(x, rotations)
    check(
        "apply_rope(x, rotations)",
        rope.apply_rope(x, rotations),
        expected,
        mistakes=[
            (
                halves_swapped(x, rotations),
                "you paired channel i with channel i + D/2 (the 'halves' layout of "
                "GPT-NeoX); Qwen-Image pairs neighbours: (0, 1), (2, 3), ...",
            ),
            (
                mmdit.apply_rope(x, rotations.conj()),
                "you rotated backwards: multiply by the rotation, not its conjugate",
            ),
            (x, "x came back unchanged: the rotation is not applied"),
        ],
    )


def test_apply_rope_matches_diffusers():
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    x = torch.randn(2, 9, 4, 32, generator=g)
    rotations = mmdit.rope_table(positions(9), (8, 12, 12), 10000.0)
    expected = apply_rotary_emb_qwen(x, rotations, use_real=False)
    check("apply_rope against diffusers' apply_rotary_emb_qwen", rope.apply_rope(x, rotations), expected)


def test_apply_rope_keeps_the_dtype_and_computes_in_float32():
    x = torch.randn(1, 6, 2, 32, generator=g).to(torch.bfloat16)
    rotations = mmdit.rope_table(positions(6), (8, 12, 12), 10000.0)
    check(
        "apply_rope on bf16 input",
        rope.apply_rope(x, rotations),
        mmdit.apply_rope(x, rotations),
        atol=0,
        rtol=0,
    )


def test_a_rotation_keeps_each_pairs_length():
    x = torch.randn(1, 8, 2, 32, generator=g)
    out = rope.apply_rope(x, mmdit.rope_table(positions(8), (8, 12, 12), 10000.0))
    check(
        "|pair| after rotation",
        out.reshape(1, 8, 2, 16, 2).norm(dim=-1),
        x.reshape(1, 8, 2, 16, 2).norm(dim=-1),
    )

"""Lesson 05's assignment (assignments/guidance.py): true CFG with the norm rescale, and the Euler step,
against the package (qwenimage_minimal.sampling)."""

import pytest
import torch

from conftest import check, load
from qwenimage_minimal import sampling

guidance = load("guidance")
g = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("scale", [4.0, 1.5, 1.0])
def test_cfg_matches_the_package(scale):
    v_cond, v_uncond = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    plain = v_uncond + scale * (v_cond - v_uncond)
    whole = plain * (v_cond.norm() / plain.norm())
    check(
        f"cfg_combine(v_cond, v_uncond, {scale})",
        guidance.cfg_combine(v_cond, v_uncond, scale),
        sampling.cfg_combine(v_cond, v_uncond, scale),
        mistakes=[
            (
                plain,
                "the guided velocity is not rescaled: give each token the length of its conditional "
                "velocity, v * |v_cond| / |v|, the norm over the channels (dim=-1)",
            ),
            (
                whole,
                "the rescale uses one norm over the whole tensor: it is per token, over its channels "
                "(norm(dim=-1, keepdim=True))",
            ),
            (
                v_cond + scale * (v_uncond - v_cond),
                "guidance pushes the wrong way: from v_uncond towards v_cond",
            ),
        ],
    )


def test_cfg_keeps_each_tokens_conditional_length():
    v_cond, v_uncond = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    out = guidance.cfg_combine(v_cond, v_uncond, 6.0)
    check("|cfg_combine| per token", out.norm(dim=-1), v_cond.norm(dim=-1))


def test_euler_step_moves_from_sigma_to_sigma_next():
    x, v = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    expected = x + (0.55 - 0.7) * v
    check(
        "euler_step(x, v, 0.7, 0.55)",
        guidance.euler_step(x, v, 0.7, 0.55),
        expected,
        mistakes=[
            (
                x - (0.55 - 0.7) * v,
                "the step has the wrong sign: v = noise - x0 points from the data to the "
                "noise, and sigma falls, so x_next = x + (sigma_next - sigma) v",
            )
        ],
    )


def test_one_step_with_the_true_velocity_lands_on_the_data():
    x0, noise = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    check("euler_step(noise, noise - x0, 1, 0)", guidance.euler_step(noise, noise - x0, 1.0, 0.0), x0)

"""Lesson 03's assignment (assignments/schedule.py): mu, the exponential shift and the whole sampling schedule,
against the package (qwenimage_minimal.scheduler) and diffusers' calculate_shift and
FlowMatchEulerDiscreteScheduler."""

import math

import numpy as np
import pytest
import torch

from conftest import check, load
from qwenimage_minimal import scheduler

schedule = load("schedule")
OFFICIAL = scheduler.SchedulerConfig()  # base 256 -> 0.5, max 8192 -> 0.9, shift_terminal 0.02
TOKENS = [64, 256, 1024, 4096, 6889, 8192, 16384, 65536]  # below the base, at both ends, between, beyond


def test_mu_is_linear_in_the_token_count():
    got = torch.tensor([float(schedule.compute_mu(n)) for n in TOKENS], dtype=torch.float64)
    expected = torch.tensor([scheduler.compute_mu(n, OFFICIAL) for n in TOKENS], dtype=torch.float64)
    slope = (0.9 - 0.5) / (8192 - 256)
    check(
        f"compute_mu at {TOKENS} tokens",
        got,
        expected,
        mistakes=[
            (
                expected.clamp(0.5, 0.9),
                "mu is clamped to [base_shift, max_shift]: it follows the same straight line beyond both "
                "ends (extrapolated), so a 2048 x 2048 image (16384 tokens) gets mu > 0.9",
            ),
            (
                0.5 + slope * torch.tensor(TOKENS, dtype=torch.float64),
                "the line does not pass through (base_seq_len, base_shift): "
                "mu = base_shift + slope * (image_seq_len - base_seq_len)",
            ),
        ],
    )


def test_mu_matches_diffusers_calculate_shift_with_other_ends():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    ends = (256, 4096, 0.5, 1.15)  # FLUX.1's numbers: the ends must come from the arguments
    got = torch.tensor([float(schedule.compute_mu(n, *ends)) for n in TOKENS], dtype=torch.float64)
    expected = torch.tensor([calculate_shift(n, *ends) for n in TOKENS], dtype=torch.float64)
    check("compute_mu(tokens, 256, 4096, 0.5, 1.15) against diffusers' calculate_shift", got, expected)


@pytest.mark.parametrize(
    "mu, dtype", [(0.5, torch.float32), (math.log(3), torch.float64), (-0.3, torch.float32)]
)
def test_the_shift_matches_the_package(mu, dtype):
    sigmas = torch.cat(
        [torch.linspace(1, 1 / 9, 9), torch.rand(7, generator=torch.Generator().manual_seed(0))]
    )
    sigmas = sigmas.clamp(min=1e-3).to(dtype)
    expected = scheduler.shift_sigmas(sigmas, mu)
    check(
        f"shift_sigmas(sigmas, mu={mu:.3g}) in {dtype}",
        schedule.shift_sigmas(sigmas, mu),
        expected,
        mistakes=[
            (
                scheduler.shift_sigmas(sigmas, mu, "linear"),
                "this is the 'linear' time shift (mu in place of e^mu); Qwen-Image's is exponential: "
                "e^mu / (e^mu + 1/sigma - 1)",
            ),
            (
                1 - scheduler.shift_sigmas(1 - sigmas, mu),
                "the shift was applied to 1 - sigma (t = 0 at the noise), which pushes the steps towards 0; "
                "apply it to sigma itself, where sigma = 1 is pure noise",
            ),
        ],
        **(dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)),
    )


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_the_schedule_has_one_more_sigma_than_steps_and_ends_at_zero(steps):
    got = schedule.get_sigmas(steps, 4096)
    assert isinstance(got, torch.Tensor) and got.shape == (steps + 1,), (
        f"get_sigmas({steps}, 4096): shape {tuple(getattr(got, 'shape', ()))}, expected ({steps + 1},): "
        "N steps visit N sigmas and land on one more, so append a 0 after the stretched schedule"
    )
    assert got[-1] == 0 and got[0] == 1, (
        f"get_sigmas({steps}, 4096) runs from {got[0].item():.6g} to {got[-1].item():.6g}: it must start at 1 "
        "(pure noise; the shift and the stretch keep 1 at 1) and end at 0 (the image)"
    )


@pytest.mark.parametrize("steps, tokens", [(50, 4096), (4, 6889), (7, 64), (2, 16384)])
def test_the_schedule_matches_the_package(steps, tokens):
    expected = scheduler.get_schedule(OFFICIAL, steps, tokens)
    mu = scheduler.compute_mu(tokens, OFFICIAL)
    evenly = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    stretched_first = scheduler.shift_sigmas(scheduler.stretch_to_terminal(evenly, 0.02), mu)
    check(
        f"get_sigmas({steps}, {tokens})",
        schedule.get_sigmas(steps, tokens),
        expected,
        mistakes=[
            (
                scheduler.get_schedule(scheduler.SchedulerConfig(shift_terminal=None), steps, tokens),
                "the schedule is not stretched: after the shift, rescale 1 - sigma by "
                "(1 - shift_terminal) / (1 - last sigma) so that the last sigma before 0 is 0.02",
            ),
            (
                torch.cat([stretched_first, torch.zeros(1, dtype=torch.float64)]).float(),
                "stretch and shift are in the wrong order: shift first, then stretch (the stretch is what "
                "puts the last sigma exactly on shift_terminal)",
            ),
            (
                scheduler.get_schedule(scheduler.SchedulerConfig(time_shift_type="linear"), steps, tokens),
                "a linear shift (mu in place of e^mu): Qwen-Image's shift is exponential",
            ),
            (expected * 1000, "these are timesteps (sigma * 1000): return the sigmas, in [0, 1]"),
        ],
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("steps, tokens", [(50, 4096), (8, 6889), (3, 100000)])
def test_the_schedule_matches_diffusers(steps, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = OFFICIAL
    ref = FlowMatchEulerDiscreteScheduler.from_config(c.to_json())  # the official scheduler_config.json
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as QwenImagePipeline calls it
    check(
        f"get_sigmas({steps}, {tokens}) against diffusers",
        schedule.get_sigmas(steps, tokens),
        ref.sigmas,
        atol=1e-6,
        rtol=1e-6,
    )


def test_lightning_is_a_constant_shift_of_3_without_stretch():
    got = schedule.get_sigmas(4, 4096, math.log(3), math.log(3), None)
    # by hand: 3 sigma / (1 + 2 sigma) at sigma = 1, 0.75, 0.5, 0.25
    check("get_sigmas(4, 4096, ln 3, ln 3, None) (Lightning)", got, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    lightning = scheduler.get_schedule(scheduler.lightning_config(), 8, 1024)
    check(
        "get_sigmas(8, 1024, ln 3, ln 3, None)",
        schedule.get_sigmas(8, 1024, math.log(3), math.log(3), None),
        lightning,
        atol=1e-6,
        rtol=1e-6,
    )

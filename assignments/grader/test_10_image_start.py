"""Lesson 10's assignment (assignments/image_start.py): SDEdit's start and inpainting's blend, against the package
(qwenimage_minimal.pipeline) and diffusers' QwenImageImg2ImgPipeline.get_timesteps, its scheduler's scale_noise
and QwenImageInpaintPipeline's mask packing."""

import types

import pytest
import torch
import torch.nn.functional as F

from conftest import check, load
from qwenimage_minimal import images, pipeline, scheduler
from qwenimage_minimal.nano import scenes
from qwenimage_minimal.pipeline import img2img, inpaint

start = load("image_start")
g = torch.Generator().manual_seed(0)
STRENGTHS = (0.01, 0.2, 0.3, 0.45, 0.5, 0.6, 0.7, 0.8, 0.99, 1.0)


def schedule(steps: int) -> torch.Tensor:
    """Qwen-Image's (steps + 1,) sigmas at 256 image tokens: shifted, the last one 0."""
    return scheduler.get_schedule(scheduler.SchedulerConfig(), steps, 256)


def diffusers_scheduler(sigmas):
    from diffusers import FlowMatchEulerDiscreteScheduler

    kept = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # takes the sigmas as given
    kept.set_timesteps(sigmas=sigmas[:-1].tolist())
    return kept


@pytest.mark.parametrize("steps", [20, 7, 50])
def test_the_number_of_steps_run(steps):
    sigmas = schedule(steps)
    run = lambda kept: torch.tensor([len(kept(sigmas, s)) - 1 for s in STRENGTHS]).float()
    expected = run(pipeline.strength_schedule)
    check(
        f"steps run (len(kept_sigmas) - 1) of {steps} at strengths {STRENGTHS}",
        run(start.kept_sigmas),
        expected,
        mistakes=[
            (expected - 1, "one step too few: drop int(N - N * strength) steps, and keep every later sigma"),
            (
                run(lambda sig, s: sig[max(int(steps - steps * s) - 1, 0) :]),
                "one step too many: sigmas[dropped:] starts at the first kept sigma, not the one before",
            ),
            (
                torch.tensor([steps - round(steps - steps * s) for s in STRENGTHS]).float(),
                "the dropped steps were rounded: diffusers truncates, int(N - N * strength)",
            ),
        ],
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("strength", [0.6, 0.3, 1.0])
def test_the_kept_sigmas_match_diffusers_get_timesteps(strength):
    from diffusers import QwenImageImg2ImgPipeline

    sigmas = schedule(20)
    fake = types.SimpleNamespace(scheduler=diffusers_scheduler(sigmas))  # all that get_timesteps reads
    timesteps, steps_run = QwenImageImg2ImgPipeline.get_timesteps(fake, 20, strength, "cpu")
    expected = fake.scheduler.sigmas[fake.scheduler.begin_index :]
    got = start.kept_sigmas(sigmas, strength)
    check(f"kept_sigmas(sigmas, {strength}) against diffusers' get_timesteps", got, expected)
    assert len(got) - 1 == steps_run == len(timesteps)


def test_no_step_left_is_refused():
    for strength in (1e-17, 0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            start.kept_sigmas(schedule(20), strength)


@pytest.mark.parametrize("strength", [0.6, 0.45, 1.0])
def test_sdedit_start_matches_the_package_and_diffusers(strength):
    sigmas = schedule(20)
    x0, noise = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    kept = pipeline.strength_schedule(sigmas, strength)
    expected = img2img.noised(x0, noise, kept[0])
    skip = len(sigmas) - len(kept)
    mistakes = [
        (img2img.noised(noise, x0, kept[0]), "x0 and the noise are swapped: sigma weighs the noise"),
        (img2img.noised(x0, noise, torch.tensor(strength)), "sigma_s is the first kept sigma, not strength"),
        (img2img.noised(x0, noise, sigmas[skip + 1]), "the start is one sigma late: use kept_sigmas(...)[0]"),
        *([(img2img.noised(x0, noise, sigmas[skip - 1]), "the start is one sigma early")] if skip else []),
    ]
    got = start.sdedit_start(x0, noise, sigmas, strength)
    check(f"sdedit_start at strength {strength}", got, expected, mistakes=mistakes)

    from diffusers import QwenImageImg2ImgPipeline

    fake = types.SimpleNamespace(scheduler=diffusers_scheduler(sigmas))
    timesteps, _ = QwenImageImg2ImgPipeline.get_timesteps(fake, 20, strength, "cpu")
    check(
        "sdedit_start against diffusers' scale_noise",
        got,
        fake.scheduler.scale_noise(x0, timesteps[:1], noise),
    )


def package_mask_tokens(mask, width, height, channels):
    """InpaintSteps.mask_tokens on a stand-in for the pipeline: the sizes it reads, nothing else."""
    fake = types.SimpleNamespace(
        vae_scale_factor=8,
        transformer=types.SimpleNamespace(
            config=types.SimpleNamespace(patch_size=2), img_in=torch.nn.Linear(1, 1)
        ),
        vae=types.SimpleNamespace(config=types.SimpleNamespace(z_dim=channels)),
        device="cpu",
    )
    return inpaint.InpaintSteps.mask_tokens(fake, mask, width, height, None, 1)


@pytest.mark.parametrize(
    "position, grow, width, height",
    [("center", 0, 128, 128), ("top right", 6, 128, 128), ("bottom left", 3, 96, 160)],
)
def test_mask_tokens_match_the_package_and_diffusers(position, grow, width, height):
    from diffusers import QwenImageInpaintPipeline

    mask = scenes.cell_mask(position, 128, grow).resize((width, height))  # cell edges off the 16-pixel grid
    pixels = images.mask_to_tensor(mask)  # (1, 1, H, W) of 0 / 1
    expected = package_mask_tokens(mask, width, height, 16)
    h, w = height // 8, width // 8
    pack = lambda grid: QwenImageInpaintPipeline._pack_latents(grid.repeat(1, 16, 1, 1), 1, 16, h, w)
    got = start.mask_tokens(pixels, 16)
    check(
        f"mask_tokens of the {position} cell mask (grown {grow} px) at {width}x{height}",
        got,
        expected,
        mistakes=[
            (1 - expected, "the mask is inverted: 1 (white) is the region to repaint"),
            (
                pack(F.max_pool2d(pixels, 8)),
                "a latent pixel took its 8 x 8 block's max: nearest takes pixel 8j",
            ),
            (
                pack(F.avg_pool2d(pixels, 8)),
                "a latent pixel took its 8 x 8 block's mean: nearest takes pixel 8j",
            ),
        ],
    )
    check(
        "mask_tokens against diffusers' interpolate and _pack_latents",
        got,
        pack(F.interpolate(pixels, (h, w))),
    )


@pytest.mark.parametrize("i", [0, 3, 6])  # the first step, one in the middle, the last
def test_blend_matches_the_package_and_diffusers(i):
    sigmas = schedule(7)
    x, x0, noise = (torch.randn(2, 24, 16, generator=g) for _ in range(3))
    repaint = (torch.rand(2, 24, 1, generator=g) > 0.5).float().expand(2, 24, 16)
    expected = inpaint.keep_known(x0, noise, repaint, sigmas)(i, x)
    known_now, known_next = img2img.noised(x0, noise, sigmas[i]), img2img.noised(x0, noise, sigmas[i + 1])
    got = start.blend(x, x0, noise, repaint, sigmas, i)
    check(
        f"blend after step {i} of 7",
        got,
        expected,
        mistakes=[
            (
                (1 - repaint) * known_now + repaint * x,
                "the known region was noised to the current sigma, "
                "sigmas[i]: the step has taken x to sigmas[i + 1]",
            ),
            (repaint * known_next + (1 - repaint) * x, "the mask is inverted: keep x where repaint is 1"),
            (
                (1 - repaint) * x0 + repaint * x,
                "the known region was put back clean: noise it to sigmas[i + 1]",
            ),
        ],
    )
    kept = diffusers_scheduler(sigmas)  # QwenImageInpaintPipeline's loop, after its step i:
    proper = x0 if i == len(sigmas) - 2 else kept.scale_noise(x0, kept.timesteps[i + 1 : i + 2], noise)
    check("blend against diffusers' inpainting loop", got, (1 - repaint) * proper + repaint * x)

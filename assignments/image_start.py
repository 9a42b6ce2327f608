"""Assignment for lesson 10 (notebooks/10_image_conditioning.ipynb, sections 1 and 2): starting from a picture.
SDEdit's start (which steps run for a strength, and the noised starting latents) and inpainting's blend after
every step (the mask on the latent grid, the known region put back at the next noise level).

Write the four functions below, then run `make grade LESSON=10`. The package's own are
`qwenimage_minimal.pipeline.strength_schedule`, `pipeline.img2img.noised`, `pipeline.inpaint.keep_known` and
`InpaintSteps.mask_tokens`: do not call them (the grader compares against them and against diffusers'
QwenImageImg2ImgPipeline.get_timesteps and QwenImageInpaintPipeline's loop).
"""

import torch


def kept_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The schedule (N + 1,) (N steps, from ~1 down, the last sigma 0) that img2img runs at `strength` in (0, 1].

    diffusers' rule: of the N steps, drop the first int(N - N * strength) (int truncates: the floor) and keep
    the rest, so the result is sigmas[dropped:], starting at the first kept sigma. A ValueError naming
    strength when no step would be left (or when strength is not in (0, 1])."""
    raise NotImplementedError("kept_sigmas: see lesson 10, section 1 (SDEdit: which steps run)")


def sdedit_start(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, strength: float
) -> torch.Tensor:
    """The latents img2img starts from: the picture's latents x0 noised to sigma_s, the first sigma that
    kept_sigmas(sigmas, strength) keeps, on flow matching's straight path: (1 - sigma_s) x0 + sigma_s noise.
    x0, noise: packed latents (B, N, C), of one shape; the result has their shape and dtype."""
    raise NotImplementedError("sdedit_start: see lesson 10, section 1 (start the flow part-way)")


def mask_tokens(mask: torch.Tensor, channels: int, patch: int = 2, scale: int = 8) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) of 0 (keep) and 1 (repaint) -> the mask as packed latent tokens
    (B, (H / scale / patch) * (W / scale / patch), channels * patch²), float32 of 0 / 1.

    Resize it to the latent grid (H / scale, W / scale) by nearest neighbour (F.interpolate's default: latent
    pixel j takes pixel scale * j), repeat it over the `channels` latent channels, and pack it as the latents
    are packed (mmdit.pack_latents: patch x patch patches, row-major, each token's features channel by
    channel, [c0 at (0, 0), (0, 1), (1, 0), (1, 1), c1 at ...])."""
    raise NotImplementedError("mask_tokens: see lesson 10, section 2 (the mask on the latent grid)")


def blend(
    x: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    repaint: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
) -> torch.Tensor:
    """Inpainting after Euler step i (from sigmas[i] to sigmas[i + 1]) of the schedule `sigmas` (N + 1,): the
    known region put back where the flow has reached.

    x, x0 (the picture's latents), noise (the starting noise), repaint (mask_tokens: 1 = repaint): (B, N, C).
    -> (1 - repaint) * known + repaint * x, known = (1 - sigma) x0 + sigma noise at sigma = sigmas[i + 1] (x0
    itself after the last step, where sigmas[i + 1] = 0)."""
    raise NotImplementedError("blend: see lesson 10, section 2 (inpainting: blend after every step)")

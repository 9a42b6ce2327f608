"""Sampling: from noise to latents, as plain functions that read as the math.

    x = noise                                           (B, N, 64) packed tokens at sigma = 1
    for sigma, sigma_next in the schedule (scheduler.get_schedule):
        v = MMDiT([x | reference tokens], prompt, sigma)[:, :N]     predicted velocity noise - x0
        with CFG: v = cfg_combine(v, v_negative, scale)
        x = x + (sigma_next - sigma) * v                              Euler step

The text-to-image and Edit pipelines both call `denoise`; Edit's reference tokens (its input
images' latents) ride along after the noise tokens and are never noised. The training loop's
validation samples come from the same function.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .scheduler import euler_step


def initial_noise(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise as diffusers draws it: on the generator's device, then moved; with a list of
    generators, one per sample. The same generator gives the same tensor as the reference."""
    if isinstance(generator, list):
        return torch.cat([initial_noise((1, *shape[1:]), g, device, dtype) for g in generator])
    generator_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=generator_device, dtype=dtype).to(device)


def join_prompts(cond: tuple, uncond: tuple) -> tuple:
    """(embeds (B, L1, D), mask or None) and (embeds (B, L2, D), mask or None) -> one batch (2B, max L, D)
    with its padding mask (None when nothing is padded): both CFG passes in one transformer call."""
    length = max(cond[0].shape[1], uncond[0].shape[1])
    embeds, masks = [], []
    for e, m in (cond, uncond):
        m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m.long()
        embeds.append(F.pad(e, (0, 0, 0, length - e.shape[1])))  # zeros after the text
        masks.append(F.pad(m, (0, length - e.shape[1])))  # ... and masked out
    mask = torch.cat(masks)  # (2B, L)
    return torch.cat(embeds), (None if bool(mask.all()) else mask)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True classifier-free guidance with norm rescale: push away from the unconditional prediction,
    then give each token the length of its conditional prediction (over its channels), which
    keeps large scales from over-saturating."""
    combined = v_uncond + scale * (v_cond - v_uncond)  # (B, N, C)
    return combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


@torch.no_grad()
def denoise(
    model,
    x: torch.Tensor,
    prompt: tuple,
    sigmas: torch.Tensor,
    img_shapes: list,
    negative_prompt: tuple | None = None,
    cfg_scale: float = 1.0,
    reference: torch.Tensor | None = None,
    on_step: Callable | None = None,
    progress: bool = False,
    batch_cfg: bool = False,
    control: Callable | None = None,
    cfg_combine: Callable = cfg_combine,
    euler_step: Callable = euler_step,
) -> torch.Tensor:
    """Integrate the flow from sigmas[0] to sigmas[-1] = 0 with Euler steps.

    model            the MMDiT: model(tokens, embeds, mask, sigma, img_shapes) -> velocity
    x                (B, N, C) packed noise
    prompt           (embeds (B, L, D), mask (B, L) or None)
    sigmas           (steps + 1,) the schedule, last 0
    img_shapes       [(frames, h, w)] of the noise and then of each reference image, in tokens
    negative_prompt  the same for the unconditional branch; with cfg_scale > 1 it enables CFG
    reference        (B, M, C) packed reference-image tokens (Edit), or None
    on_step          on_step(i, x) after each step; a returned tensor replaces x
    batch_cfg        run the conditional and unconditional passes as one batch of 2B, the shorter prompt
                     padded and masked: equal up to rounding, and streamed weights (streaming.py) then
                     cross the bus once per step instead of twice
    control          control(i, x, sigma) -> the ControlNets' residuals for this step (a list of (B, N, dim))
                     or None; computed once per step with the positive prompt and given to both CFG
                     passes, as diffusers does (mmdit.MMDiT.forward's controlnet_block_samples)
    cfg_combine      cfg_combine(v, v_uncond, cfg_scale) -> the guided velocity: this file's unless given
    euler_step       euler_step(x, v, sigma, sigma_next) -> x at sigma_next: scheduler.euler_step unless given
                     (the pipelines pass their `cfg_combine` and `euler_step` attributes: the course's
                     capstone, assignments/capstone.py, puts a student's there)
    returns          (B, N, C) latents at sigma = 0
    """
    batch, n_noise = x.shape[:2]
    both = join_prompts(prompt, negative_prompt) if batch_cfg and negative_prompt is not None else None
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="denoising")
    for i in steps:
        # The reference hands the model t = 1000 sigma rounded to the latents' dtype, then / 1000.
        t = (sigmas[i] * 1000).expand(batch).to(x.dtype)
        sigma = t / 1000  # (B,)
        tokens = x if reference is None else torch.cat([x, reference], dim=1)  # (B, N [+ M], C)
        residuals = None if control is None else control(i, x, sigma)
        steer = {} if residuals is None else {"controlnet_block_samples": residuals}
        if both is not None:  # one call of batch 2B
            if residuals is not None:
                steer = {"controlnet_block_samples": [r.repeat(2, 1, 1) for r in residuals]}
            v, v_uncond = model(tokens.repeat(2, 1, 1), *both, sigma.repeat(2), img_shapes, **steer)[
                :, :n_noise
            ].chunk(2)
        else:
            v = model(tokens, *prompt, sigma, img_shapes, **steer)[:, :n_noise]  # (B, N, C)
            if negative_prompt is not None:
                v_uncond = model(tokens, *negative_prompt, sigma, img_shapes, **steer)[:, :n_noise]
        if negative_prompt is not None:
            v = cfg_combine(v, v_uncond, cfg_scale)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        if on_step is not None:
            replaced = on_step(i, x)
            x = x if replaced is None else replaced
    return x

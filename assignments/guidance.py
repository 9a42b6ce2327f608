"""Assignment for lesson 05 (notebooks/05_text_to_image.ipynb): one step of the sampling loop.

Write the two functions below, then run `make grade LESSON=05`. The package's own are
`qwenimage_minimal.sampling.cfg_combine` and `qwenimage_minimal.scheduler.euler_step` (which
`sampling.denoise` calls at every step).
"""

import torch


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True classifier-free guidance with Qwen-Image's norm rescale, on (B, N, C) velocities:
    v = v_uncond + scale (v_cond - v_uncond), then each token's v (its C channels) rescaled to the length of
    its conditional velocity: v * |v_cond| / |v|."""
    raise NotImplementedError("cfg_combine: see lesson 05 (CFG and its norm rescale)")


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow x_sigma = (1 - sigma) x0 + sigma noise, whose velocity is v = noise - x0:
    from sigma to sigma_next (< sigma)."""
    raise NotImplementedError("euler_step: see lessons 03 and 05 (the flow and its velocity)")

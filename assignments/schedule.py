"""Assignment for lesson 03 (notebooks/03_scheduler.ipynb, section 5): the sampling schedule of Qwen-Image.

Write the three functions below, then run `make grade LESSON=03`. The package's own versions are
`qwenimage_minimal.scheduler.compute_mu`, `shift_sigmas` and `get_schedule`: do not call them (the grader
compares against them, and against diffusers' `calculate_shift` and `FlowMatchEulerDiscreteScheduler`).
"""

import torch


def compute_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
) -> float:
    """The shift exponent mu for an image of `image_seq_len` tokens ((H/16)·(W/16) for one image).

    mu is linear in the token count: base_shift at base_seq_len tokens, max_shift at max_seq_len tokens,
    and the same straight line beyond both ends (extrapolated, never clamped). Returns a Python float."""
    raise NotImplementedError("compute_mu: see lesson 03, section 5 (mu linear in the token count)")


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The exponential time shift, elementwise on sigmas in (0, 1]:

        sigma' = e^mu / (e^mu + (1/sigma - 1))

    which equals s·sigma / (1 + (s - 1)·sigma) with s = e^mu: sigmas move towards 1 (more steps at high
    noise), sigma = 1 stays 1. Returns a tensor of the same shape and dtype."""
    raise NotImplementedError("shift_sigmas: see lesson 03, section 5 (the exponential shift)")


def get_sigmas(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
    shift_terminal: float | None = 0.02,
) -> torch.Tensor:
    """The sigmas a sampler visits: (num_steps + 1,) float32, from 1 down, the last one 0.

    1. start evenly spaced: linspace(1, 1/N, N) for N = num_steps;
    2. shift them with mu = compute_mu(image_seq_len, 256, 8192, base_shift, max_shift);
    3. if shift_terminal is not None, stretch 1 - sigma so that the last sigma is exactly shift_terminal
       and the first stays 1: sigma <- 1 - (1 - sigma) · (1 - shift_terminal) / (1 - sigma_last);
       a one-step schedule is just [1], with nothing to stretch;
    4. append a 0: the last step lands on the image.

    Qwen-Image: base_shift 0.5, max_shift 0.9, shift_terminal 0.02. Qwen-Image-Lightning: a constant shift
    of 3 (base_shift = max_shift = ln 3) and no stretch (shift_terminal None)."""
    raise NotImplementedError("get_sigmas: see lesson 03, section 5 (linspace, shift, stretch, append 0)")

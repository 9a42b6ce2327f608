"""Assignment for lesson 08 (notebooks/08_training.ipynb, sections 1 to 3): the flow-matching training loss.

Write the five functions below, then run `make grade LESSON=08`. The package computes the same inside
`qwenimage_minimal.train.flow_matching_loss`, `timestep_density` and `pick_timesteps`: do not call them (the
grader compares against them, and against diffusers' `compute_density_for_timestep_sampling` and
`FlowMatchEulerDiscreteScheduler.scale_noise`).
"""

import torch


def logit_normal_u(n: torch.Tensor, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """SD3's logit-normal density, made deterministic: n (B,) draws of N(0, 1) -> u (B,) in (0, 1).

    u = sigmoid(logit_mean + logit_std * n), i.e. logit(u) ~ N(logit_mean, logit_std²): diffusers'
    compute_density_for_timestep_sampling("logit_normal", ...) without its own draw."""
    raise NotImplementedError("logit_normal_u: see lesson 08, section 2 (the logit-normal density)")


def training_sigmas(u: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """u (B,) in [0, 1] -> the training noise levels sigma (B,) float32.

    The training schedule has timesteps t = 1000, 999, ..., 1 (index 0 is pure noise) and sigma = t / 1000.
    u picks the entry index = min(int(1000 u), 999) (truncated; u = 1 takes the last one), so
    sigma = 1 - index / 1000: a multiple of 1/1000 close to 1 - u, at least 0.001, never 0."""
    raise NotImplementedError("training_sigmas: see lesson 08, section 2 (u picks the timestep)")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The point on the straight path: x_sigma = (1 - sigma) x0 + sigma noise.

    x0, noise (B, C, h, w) latents; sigma (B,), one noise level per sample. Returns x0's shape and dtype."""
    raise NotImplementedError("noisy_latents: see lesson 08, section 1 (the straight path)")


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the path's velocity d x_sigma / d sigma, the same at every sigma."""
    raise NotImplementedError("velocity_target: see lesson 08, section 1 (the velocity of the path)")


def flow_matching_loss(
    prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of one batch: a 0-d float32 tensor.

    prediction, x0, noise (B, C, h, w); weight (B,) per-sample loss weights w(sigma), or None for w = 1.
    Each sample's loss is the mean over its elements of w · (prediction - target)², computed in float32; the
    batch's loss is the mean of the samples' losses (diffusers' DreamBooth script, and train.py)."""
    raise NotImplementedError(
        "flow_matching_loss: see lesson 08, sections 1 and 3 (the loss, one step by hand)"
    )

"""A typical wrong solution: the straight path the other way round, sigma x0 + (1 - sigma) noise."""

from assignments.solutions.flow_loss import (  # noqa: F401  (the mistake is in noisy_latents only)
    flow_matching_loss,
    logit_normal_u,
    training_sigmas,
    velocity_target,
)


def noisy_latents(x0, noise, sigma):
    sigma = sigma.to(x0.dtype).view(-1, 1, 1, 1)
    return sigma * x0 + (1 - sigma) * noise

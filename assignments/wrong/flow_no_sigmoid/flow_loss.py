"""A typical wrong solution: the logit-normal draw used as u without the sigmoid."""

from assignments.solutions.flow_loss import (  # noqa: F401  (the mistake is in logit_normal_u only)
    flow_matching_loss,
    noisy_latents,
    training_sigmas,
    velocity_target,
)


def logit_normal_u(n, logit_mean=0.0, logit_std=1.0):
    return logit_mean + logit_std * n

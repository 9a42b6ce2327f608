"""A typical wrong solution: the velocity target x0 - noise (the sign), in the target and so in the loss."""

from assignments.solutions.flow_loss import logit_normal_u, noisy_latents, training_sigmas  # noqa: F401


def velocity_target(x0, noise):
    return x0 - noise  # the mistake: the path goes from x0 (sigma = 0) to the noise (sigma = 1)


def flow_matching_loss(prediction, x0, noise, weight=None):
    per_sample = ((prediction.float() - velocity_target(x0, noise).float()) ** 2).reshape(len(x0), -1).mean(1)
    return (per_sample if weight is None else weight.float() * per_sample).mean()

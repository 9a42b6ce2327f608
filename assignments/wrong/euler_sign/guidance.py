"""A typical wrong solution: the Euler step taken with the wrong sign (as if v pointed from noise to data)."""

from assignments.solutions.guidance import cfg_combine  # noqa: F401


def euler_step(x, v, sigma, sigma_next):
    return x - (sigma_next - sigma) * v

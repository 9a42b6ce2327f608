"""A typical wrong solution: the linear time shift, mu used where e^mu belongs."""

from assignments.solutions.schedule import compute_mu, get_sigmas  # noqa: F401  (the mistake is in shift_sigmas)


def shift_sigmas(sigmas, mu):
    return mu / (mu + (1 / sigmas - 1))

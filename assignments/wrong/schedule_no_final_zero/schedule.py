"""A typical wrong solution: the schedule stops at shift_terminal, without the final 0."""

import torch

from assignments.solutions.schedule import compute_mu, shift_sigmas


def get_sigmas(num_steps, image_seq_len, base_shift=0.5, max_shift=0.9, shift_terminal=0.02):
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigmas = shift_sigmas(sigmas, compute_mu(image_seq_len, 256, 8192, base_shift, max_shift))
    if shift_terminal is not None and num_steps > 1:
        sigmas = 1 - (1 - sigmas) * (1 - shift_terminal) / (1 - sigmas[-1])
    return sigmas.float()  # the mistake: no 0 appended, so the last step never reaches the image

"""Reference solution of assignments/schedule.py (the instructor's; `make student` leaves this folder out)."""

import math

import torch


def compute_mu(image_seq_len, base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9):
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)  # mu per token
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift_sigmas(sigmas, mu):
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def get_sigmas(num_steps, image_seq_len, base_shift=0.5, max_shift=0.9, shift_terminal=0.02):
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)  # (N,)
    sigmas = shift_sigmas(sigmas, compute_mu(image_seq_len, 256, 8192, base_shift, max_shift))
    if shift_terminal is not None and num_steps > 1:
        sigmas = 1 - (1 - sigmas) * (1 - shift_terminal) / (1 - sigmas[-1])
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()  # (N + 1,)

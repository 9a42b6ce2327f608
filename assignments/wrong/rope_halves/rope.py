"""A typical wrong solution: RoPE with the halves swapped for pairs (x[:D/2] with x[D/2:], GPT-NeoX's layout)."""

import torch

from assignments.solutions.rope import rope_table  # noqa: F401  (this mistake is in apply_rope only)


def apply_rope(x, rotations):
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half].float(), x[..., half:].float())
    out = pairs * rotations[:, None, :]
    return torch.cat([out.real, out.imag], dim=-1).type_as(x)

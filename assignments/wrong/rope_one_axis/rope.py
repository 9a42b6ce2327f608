"""A typical wrong solution: one frequency ladder over the whole head (1D RoPE) instead of one per axis."""

import torch

from assignments.solutions.rope import apply_rope  # noqa: F401


def rope_table(positions, axes_dims, theta):
    dim = sum(axes_dims)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    sizes = [d // 2 for d in axes_dims]
    pos = torch.cat([positions[:, a, None].float().expand(-1, n) for a, n in enumerate(sizes)], dim=-1)
    angles = pos * inv_freq
    return torch.polar(torch.ones_like(angles), angles)

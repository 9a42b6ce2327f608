"""Reference solution of assignments/rope.py (the instructor's; `make student` leaves this folder out)."""

import torch


def rope_table(positions: torch.Tensor, axes_dims: tuple, theta: float) -> torch.Tensor:
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
        angles.append(positions[:, axis, None].float() * inv_freq)  # (S, dim/2)
    angles = torch.cat(angles, dim=-1)  # (S, D/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, S, H, D/2)
    return torch.view_as_real(pairs * rotations[:, None, :]).flatten(-2).type_as(x)  # (B, S, H, D)

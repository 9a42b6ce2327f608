"""Reference solution of assignments/guidance.py."""

import torch


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    v = v_uncond + scale * (v_cond - v_uncond)  # (B, N, C)
    return v * (v_cond.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v

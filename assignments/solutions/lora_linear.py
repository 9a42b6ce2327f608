"""Reference solution of assignments/lora_linear.py."""

import torch
import torch.nn.functional as F


def lora_forward(x, weight, bias, A, B, alpha: float, scale: float = 1.0) -> torch.Tensor:
    return F.linear(x, weight, bias) + scale * (alpha / A.shape[0]) * F.linear(F.linear(x, A), B)


def fused_weight(weight, A, B, alpha: float, scale: float = 1.0) -> torch.Tensor:
    return (weight.float() + scale * (alpha / A.shape[0]) * (B.float() @ A.float())).to(weight.dtype)

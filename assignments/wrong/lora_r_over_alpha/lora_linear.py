"""A typical wrong solution: the low-rank correction scaled by r / alpha instead of alpha / r."""

import torch.nn.functional as F

from assignments.solutions.lora_linear import fused_weight  # noqa: F401


def lora_forward(x, weight, bias, A, B, alpha, scale=1.0):
    return F.linear(x, weight, bias) + scale * (A.shape[0] / alpha) * F.linear(F.linear(x, A), B)

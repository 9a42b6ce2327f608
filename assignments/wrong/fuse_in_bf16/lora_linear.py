"""A typical wrong solution: fusing in the weight's own dtype (bf16), which rounds B A before adding it."""

from assignments.solutions.lora_linear import lora_forward  # noqa: F401


def fused_weight(weight, A, B, alpha, scale=1.0):
    return weight + (scale * (alpha / A.shape[0]) * (B.to(weight.dtype) @ A.to(weight.dtype)))

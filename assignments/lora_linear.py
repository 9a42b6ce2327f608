"""Assignment for lesson 07 (notebooks/07_lora.ipynb, sections 1 and 4): a LoRA layer's forward and its fusing.

Write the two functions below, then run `make grade LESSON=07`. The package's own is
`qwenimage_minimal.lora.LoRALinear`.
"""

import torch


def lora_forward(x, weight, bias, A, B, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """y = x W^T + b + scale * (alpha / r) * (x A^T) B^T for x (..., in), W (out, in), b (out,) or None,
    A (r, in), B (out, r): the frozen Linear plus the low-rank correction (r = A's rows)."""
    raise NotImplementedError("lora_forward: see lesson 07, section 1 (alpha / r scaling)")


def fused_weight(weight, A, B, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """The weight that gives lora_forward's output with a plain Linear: W + scale * (alpha / r) * B A, computed in
    float32 and returned in W's dtype."""
    raise NotImplementedError("fused_weight: see lesson 07, section 4 (fusing)")

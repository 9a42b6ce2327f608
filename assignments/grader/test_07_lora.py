"""Lesson 07's assignment (assignments/lora_linear.py): a LoRA layer's forward and its fused weight, against the
package's LoRALinear (qwenimage_minimal.lora)."""

import pytest
import torch
from torch import nn

from conftest import check, load
from qwenimage_minimal import lora

student = load("lora_linear")
g = torch.Generator().manual_seed(0)


def layer(bias: bool = True, dtype=torch.float32):
    """The package's LoRALinear around a random Linear(24 -> 20), rank 4, alpha 8, and its tensors."""
    base = nn.Linear(24, 20, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(20, 24, generator=g))
        if bias:
            base.bias.copy_(torch.randn(20, generator=g))
    A, B = torch.randn(4, 24, generator=g), torch.randn(20, 4, generator=g)
    wrapped = lora.LoRALinear(base.to(dtype))
    wrapped.add("a", A.to(dtype), B.to(dtype), alpha=8.0)
    return wrapped, A.to(dtype), B.to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_the_forward_matches_lora_linear(bias, scale):
    wrapped, A, B = layer(bias)
    wrapped.scale["a"] = scale
    x = torch.randn(2, 3, 24, generator=g)  # batch dims before the features
    W, b = wrapped.weight.detach(), None if wrapped.bias is None else wrapped.bias.detach()
    base = nn.functional.linear(x, W, b)
    low_rank = nn.functional.linear(nn.functional.linear(x, A), B)
    with torch.no_grad():
        expected = wrapped(x)
    check(
        f"lora_forward (bias={bias}, scale={scale})",
        student.lora_forward(x, W, b, A, B, 8.0, scale),
        expected,
        mistakes=[
            (base + scale * (4 / 8.0) * low_rank, "the correction is scaled by r / alpha: it is alpha / r"),
            (base + (8.0 / 4) * low_rank, "the adapter weight `scale` is not applied"),
            (base + scale * low_rank, "alpha / r is missing: the correction is scale * (alpha / r) * B A x"),
        ],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_weight_matches_fusing_lora_linear_bit_for_bit(dtype):
    wrapped, A, B = layer(dtype=dtype)
    wrapped.scale["a"] = 0.7
    W = wrapped.weight.detach().clone()
    in_own_dtype = W + 0.7 * (8.0 / 4) * (B @ A)
    wrapped.fused.clear()
    holder = nn.Module()
    holder.layer = wrapped
    lora.fuse(holder)
    check(
        f"fused_weight in {dtype}",
        student.fused_weight(W, A, B, 8.0, 0.7),
        wrapped.weight.detach(),
        atol=0,
        rtol=0,
        mistakes=[
            (
                in_own_dtype,
                "computed in the weight's dtype: compute W + s (alpha / r) B A in float32, then "
                "cast back once (bf16 rounds B A and the sum separately otherwise)",
            )
        ],
    )


def test_a_plain_linear_with_the_fused_weight_gives_the_forward():
    wrapped, A, B = layer()
    x = torch.randn(5, 24, generator=g)
    W, b = wrapped.weight.detach(), wrapped.bias.detach()
    fused = nn.functional.linear(x, student.fused_weight(W, A, B, 8.0, 1.0), b)
    check(
        "Linear(fused_weight) against lora_forward",
        fused,
        student.lora_forward(x, W, b, A, B, 8.0, 1.0),
        atol=1e-4,
    )

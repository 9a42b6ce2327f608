"""Lesson 09's assignment (assignments/tensor_parallel.py): tensor parallel by hand on n pretend processes, against
the unsplit layers: a Linear, the package's FeedForward (qwenimage_minimal.mmdit) and torch's MultiheadAttention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import check, load
from qwenimage_minimal import mmdit

tp = load("tensor_parallel")
g = torch.Generator().manual_seed(0)


def linear(features_in: int, features_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(features_in, features_out, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / features_in**0.5)
    return layer.requires_grad_(False)


def check_shards(what, got, expected, mistakes):
    """got and expected: lists of n tensors (a process each); mistakes: (the list a mistake gives, hint)."""
    if not isinstance(got, (list, tuple)) or len(got) != len(expected):
        raise AssertionError(
            f"{what}: expected a list of {len(expected)} shards (one per process), got {got!r:.80}"
        )
    same = lambda a, b: isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if all(same(a, b) for a, b in zip(got, expected)):
        return
    for output, hint in mistakes:  # a mistake of the wrong axis shows in the shapes, before any value
        if all(same(a, b) for a, b in zip(got, output)):
            raise AssertionError(f"{what}: {hint}")
    for r, (a, b) in enumerate(zip(got, expected)):
        check(f"{what}, process {r}", a, b, atol=0, rtol=0)


WRONG_AXIS = "the shards split the wrong axis of W (out, in): "
STRIDED = (
    "process r took every n-th feature: it holds one contiguous block, r * size / n to (r + 1) * size / n"
)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_column_shards_hold_blocks_of_output_features(n):
    layer = linear(8, 12)
    got = tp.column_shards(layer.weight, layer.bias, n)
    check_shards(
        f"column_shards weights, Linear(8 -> 12), n={n}",
        [w for w, _ in got],
        list(layer.weight.chunk(n, 0)),
        [
            (list(layer.weight.chunk(n, 1)), WRONG_AXIS + "column-wise splits the outputs, dimension 0"),
            ([layer.weight[r::n] for r in range(n)], STRIDED),
        ],
    )
    check_shards(f"column_shards biases, n={n}", [b for _, b in got], list(layer.bias.chunk(n)), [])
    assert all(b is None for _, b in tp.column_shards(layer.weight, None, n)), "no bias: each bias_r is None"


@pytest.mark.parametrize("n", [2, 3])
def test_row_shards_hold_blocks_of_input_features(n):
    layer = linear(12, 8)
    check_shards(
        f"row_shards, Linear(12 -> 8), n={n}",
        tp.row_shards(layer.weight, n),
        list(layer.weight.chunk(n, 1)),
        [
            (
                list(layer.weight.chunk(n, 0)),
                WRONG_AXIS + "row-wise splits the input features, dimension 1",
            ),
            ([layer.weight[:, r::n] for r in range(n)], STRIDED),
        ],
    )


@pytest.mark.parametrize("n", [1, 2, 4])
def test_parallel_mlp_matches_the_package_feedforward(n):
    mlp = mmdit.FeedForward(16).requires_grad_(False)
    for layer in (mlp.net[0].proj, mlp.net[2]):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.weight.shape[1] ** 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    x = torch.randn(3, 7, 16, generator=g)  # batch 3, an odd number of tokens
    expected = mlp(x)
    bias = mlp.net[2].bias
    check(
        f"parallel_mlp over the package's FeedForward(16), n={n}",
        tp.parallel_mlp(x, mlp.net[0].proj, mlp.net[2], n),
        expected,
        mistakes=[
            (
                expected + (n - 1) * bias,
                "the row-wise bias was added by every process, n times: add it once, after the sum",
            ),
            (
                expected - bias,
                "the row-wise Linear's bias is missing: add it once, after the sum of the partials",
            ),
        ],
    )


def test_parallel_mlp_without_biases():
    fan_out, fan_in = linear(10, 24, bias=False), linear(24, 10, bias=False)
    x = torch.randn(2, 5, 10, generator=g)
    expected = fan_in(F.gelu(fan_out(x), approximate="tanh"))
    check("parallel_mlp with no biases, n=3", tp.parallel_mlp(x, fan_out, fan_in, 3), expected)


def split_mid_head(x, q, k, v, out, heads, n):
    """The mistake: each process reads its slice of q, k, v as `heads` heads (of head_dim / n), not heads / n."""
    y = 0
    for r in range(n):
        parts = [F.linear(x, layer.weight.chunk(n)[r], layer.bias.chunk(n)[r]) for layer in (q, k, v)]
        parts = [p.unflatten(-1, (heads, -1)).transpose(1, 2) for p in parts]
        y = y + F.linear(
            F.scaled_dot_product_attention(*parts).transpose(1, 2).flatten(2), out.weight.chunk(n, 1)[r]
        )
    return y + out.bias


@pytest.mark.parametrize("heads, n", [(4, 2), (6, 2), (6, 3), (4, 4), (2, 1)])
def test_parallel_attention_matches_multihead_attention(heads, n):
    dim = 24
    q, k, v, out = linear(dim, dim), linear(dim, dim), linear(dim, dim), linear(dim, dim)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).requires_grad_(False)
    mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
    mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    mha.out_proj.weight.copy_(out.weight)
    mha.out_proj.bias.copy_(out.bias)
    x = torch.randn(2, 9, dim, generator=g)
    expected = mha(x, x, x, need_weights=False)[0]
    mistakes = [
        (expected + (n - 1) * out.bias, "to_out's bias was added by every process, n times: add it once")
    ]
    if n > 1 and (dim // heads) % n == 0:  # the mistake's reshape needs n to divide head_dim
        mistakes.append(
            (
                split_mid_head(x, q, k, v, out, heads, n),
                "the heads were split in the middle: a process's slice of q, k and v holds heads / n whole heads "
                "of head_dim each, so read it as (B, S, heads / n, head_dim), not (B, S, heads, head_dim / n)",
            )
        )
    check(
        f"parallel_attention against nn.MultiheadAttention, {heads} heads on n={n}",
        tp.parallel_attention(x, q, k, v, out, heads, n),
        expected,
        mistakes=mistakes,
    )


def test_a_split_that_does_not_divide_is_refused():
    layer = linear(12, 12)
    for split in (
        lambda: tp.column_shards(layer.weight, layer.bias, 5),
        lambda: tp.row_shards(layer.weight, 5),
        lambda: tp.parallel_attention(torch.zeros(1, 2, 12), layer, layer, layer, layer, 4, 3),  # 3 ∤ 4 heads
    ):
        with pytest.raises(ValueError, match=r"\bn\b"):
            split()

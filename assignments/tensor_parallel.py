"""Assignment for lesson 09 (notebooks/09_several_gpus.ipynb, section 2, "Splitting a Linear, by hand"): tensor
parallel on n pretend processes, in one process.

Write the four functions below, then run `make grade LESSON=09`. Process r is just the r-th entry of a list; the
all-reduce that adds the processes' partial outputs is a plain sum. The package splits with torch's
ColwiseParallel / RowwiseParallel (`qwenimage_minimal.parallel.BLOCK_PLAN`); here you do it by hand. The
grader compares against the unsplit layers (the package's FeedForward, torch's MultiheadAttention).
"""

import torch
from torch import nn


def column_shards(weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> list:
    """Split a Linear column-wise (by output features) over n processes -> [(weight_r, bias_r)] * n.

    weight (out, in), bias (out,) or None. Process r holds the r-th contiguous block of out / n output
    features: weight_r (out / n, in) and bias_r (out / n,) (None when bias is None). A ValueError naming n
    when n does not divide out."""
    raise NotImplementedError("column_shards: see lesson 09, section 2 (column-wise: rows of W)")


def row_shards(weight: torch.Tensor, n: int) -> list:
    """Split a Linear row-wise (by input features) over n processes -> [weight_r] * n, each (out, in / n): the
    r-th contiguous block of in / n input features. (The bias is not split: it is added once, after the sum.)
    A ValueError naming n when n does not divide in."""
    raise NotImplementedError("row_shards: see lesson 09, section 2 (row-wise: columns of W)")


def parallel_mlp(x: torch.Tensor, fan_out: nn.Linear, fan_in: nn.Linear, n: int) -> torch.Tensor:
    """The MLP fan_in(gelu(fan_out(x), approximate="tanh")) on n processes, Megatron's way: x (..., dim) whole
    on every process; fan_out column-wise, so process r computes its slice of the hidden features and their
    GELU; fan_in row-wise, so it turns that slice into a partial output (..., dim). The all-reduce adds the n
    partials; fan_in's bias (if any) is added once. -> (..., dim), equal to the unsplit MLP up to rounding."""
    raise NotImplementedError("parallel_mlp: see lesson 09, section 2 (column-wise, then row-wise)")


def parallel_attention(
    x: torch.Tensor, to_q: nn.Linear, to_k: nn.Linear, to_v: nn.Linear, to_out: nn.Linear, heads: int, n: int
) -> torch.Tensor:
    """Multi-head self-attention on n processes: x (B, S, dim) -> (B, S, dim).

    Unsplit: q, k, v = to_q(x), to_k(x), to_v(x), each (B, S, heads * head_dim) read as (B, S, heads,
    head_dim) with the heads in order; softmax(q k^T / sqrt(head_dim)) v per head
    (F.scaled_dot_product_attention on (B, heads, S, head_dim)); the heads' outputs concatenated back to
    (B, S, heads * head_dim); then to_out. Split: to_q, to_k and to_v column-wise, to_out row-wise, so that
    process r holds heads / n *whole* heads (heads r * heads / n onwards) and computes their attention alone;
    its partial to_out outputs are summed and to_out's bias added once. A ValueError naming n when n does not
    divide heads."""
    raise NotImplementedError("parallel_attention: see lesson 09, section 2 (attention: whole heads)")

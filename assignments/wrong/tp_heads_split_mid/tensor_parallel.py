"""A typical wrong solution: each process reads its slice of q, k and v with the whole model's head count, so
every head is cut across the processes (heads of head_dim / n) instead of each process holding whole heads."""

import torch.nn.functional as F

from assignments.solutions.tensor_parallel import column_shards, parallel_mlp, row_shards  # noqa: F401


def parallel_attention(x, to_q, to_k, to_v, to_out, heads, n):
    if heads % n:
        raise ValueError(f"n ({n}) must divide the heads ({heads})")
    shards = [column_shards(layer.weight, layer.bias, n) for layer in (to_q, to_k, to_v)]
    partials = []
    for r, w_out in enumerate(row_shards(to_out.weight, n)):
        # the mistake: (B, heads, S, head_dim / n) rather than (B, heads / n, S, head_dim)
        q, k, v = (F.linear(x, *shard[r]).unflatten(-1, (heads, -1)).transpose(1, 2) for shard in shards)
        partials.append(F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), w_out))
    return sum(partials) + to_out.bias

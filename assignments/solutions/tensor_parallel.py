"""Reference solution of assignments/tensor_parallel.py."""

import torch.nn.functional as F


def divides(n: int, size: int, what: str) -> None:
    if not isinstance(n, int) or n < 1 or size % n:
        raise ValueError(
            f"n (the number of processes) must be a whole number >= 1 dividing {what} {size}, got {n!r}"
        )


def column_shards(weight, bias, n):
    out = weight.shape[0]
    divides(n, out, "the output features")
    rows = [slice(r * out // n, (r + 1) * out // n) for r in range(n)]
    return [(weight[s], None if bias is None else bias[s]) for s in rows]


def row_shards(weight, n):
    features = weight.shape[1]
    divides(n, features, "the input features")
    return [weight[:, r * features // n : (r + 1) * features // n] for r in range(n)]


def parallel_mlp(x, fan_out, fan_in, n):
    partials = []
    for (w1, b1), w2 in zip(column_shards(fan_out.weight, fan_out.bias, n), row_shards(fan_in.weight, n)):
        hidden = F.gelu(F.linear(x, w1, b1), approximate="tanh")  # (..., hidden / n): this process's features
        partials.append(F.linear(hidden, w2))  # (..., dim): a partial sum, no bias
    y = sum(partials)  # the all-reduce
    return y if fan_in.bias is None else y + fan_in.bias


def parallel_attention(x, to_q, to_k, to_v, to_out, heads, n):
    divides(n, heads, "the heads")
    head_dim = to_q.weight.shape[0] // heads
    shards = [column_shards(layer.weight, layer.bias, n) for layer in (to_q, to_k, to_v)]
    partials = []
    for r, w_out in enumerate(row_shards(to_out.weight, n)):
        # (B, heads / n, S, head_dim): this process's whole heads
        q, k, v = (
            F.linear(x, *shard[r]).unflatten(-1, (heads // n, head_dim)).transpose(1, 2) for shard in shards
        )
        out = (
            F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        )  # (B, S, heads / n * head_dim)
        partials.append(F.linear(out, w_out))  # (B, S, dim)
    y = sum(partials)  # the all-reduce
    return y if to_out.bias is None else y + to_out.bias

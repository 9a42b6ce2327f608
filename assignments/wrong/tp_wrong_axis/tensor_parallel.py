"""A typical wrong solution: the two splits swapped, column-wise taking W's columns (input features) and row-wise
its rows, as if W were Megatron's A = W^T."""

from assignments.solutions import tensor_parallel


def column_shards(weight, bias, n):
    biases = [None] * n if bias is None else list(bias.chunk(n))
    return list(zip(weight.chunk(n, 1), biases))  # the mistake: dimension 1, the input features


def row_shards(weight, n):
    return list(weight.chunk(n, 0))  # the mistake: dimension 0, the output features


def parallel_mlp(x, fan_out, fan_in, n):
    return tensor_parallel.parallel_mlp(x, fan_out, fan_in, n)  # the solution's, on the solution's shards


def parallel_attention(x, to_q, to_k, to_v, to_out, heads, n):
    return tensor_parallel.parallel_attention(x, to_q, to_k, to_v, to_out, heads, n)

"""A typical wrong solution: every process adds the row-wise Linear's bias to its partial output, so the
all-reduce adds it n times."""

import torch.nn.functional as F

from assignments.solutions.tensor_parallel import column_shards, parallel_attention, row_shards  # noqa: F401


def parallel_mlp(x, fan_out, fan_in, n):
    partials = []
    for (w1, b1), w2 in zip(column_shards(fan_out.weight, fan_out.bias, n), row_shards(fan_in.weight, n)):
        hidden = F.gelu(F.linear(x, w1, b1), approximate="tanh")
        partials.append(F.linear(hidden, w2, fan_in.bias))  # the mistake: the bias in every partial
    return sum(partials)

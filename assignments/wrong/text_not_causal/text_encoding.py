"""A typical wrong solution: padding hidden, but no causal mask (every query sees the whole prompt)."""

import torch

from assignments.solutions.text_encoding import prompt_rows  # noqa: F401  (the mistake is in the attention)


def grouped_query_attention(q, k, v, attention_mask=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, Hq, S, S)
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v

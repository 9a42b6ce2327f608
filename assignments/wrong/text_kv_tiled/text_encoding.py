"""A typical wrong solution: the key/value heads tiled (k.repeat) instead of repeated in place."""

import torch

from assignments.solutions.text_encoding import prompt_rows  # noqa: F401  (the mistake is in the attention)


def grouped_query_attention(q, k, v, attention_mask=None):
    B, Hq, S, D = q.shape
    group = Hq // k.shape[1]
    k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)  # the mistake: head h reads kv head h % Hkv
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(S, dtype=torch.bool))
    scores = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(dim=-1) @ v

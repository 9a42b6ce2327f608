"""Reference solution of assignments/text_encoding.py (the instructor's; `make student` leaves this folder out)."""

import torch


def grouped_query_attention(q, k, v, attention_mask=None):
    B, Hq, S, D = q.shape
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D): query head h reads key/value head h // group
    v = v.repeat_interleave(group, dim=1)
    allowed = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[None]  # (1, S, S): j <= i
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]  # (B, S, S): and key j is a token
        nothing = ~allowed.any(-1, keepdim=True)  # (B, S, 1): queries before the first token (left padding)
        allowed = allowed | (nothing & torch.eye(S, dtype=torch.bool, device=q.device))  # they see themselves
    scores = q.float() @ k.float().transpose(-1, -2) / D**0.5  # (B, Hq, S, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # (B, Hq, S, D)


def prompt_rows(hidden, attention_mask, prefix_tokens=34):
    kept = [h[m.bool()][prefix_tokens:] for h, m in zip(hidden, attention_mask)]  # per prompt (L_b, hidden)
    L = max(len(rows) for rows in kept)
    embeds = hidden.new_zeros(len(kept), L, hidden.shape[-1])  # (B, L, hidden)
    mask = torch.zeros(len(kept), L, dtype=torch.long, device=hidden.device)  # (B, L)
    for b, rows in enumerate(kept):
        embeds[b, : len(rows)] = rows
        mask[b, : len(rows)] = 1
    return embeds, mask

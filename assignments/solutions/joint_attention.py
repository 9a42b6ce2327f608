"""Reference solution of assignments/joint_attention.py (the instructor's; `make student` leaves this folder out)."""

import torch
import torch.nn.functional as F


def joint_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_mask=None):
    L = txt_q.shape[1]
    # (B, L + N, H, D) -> (B, H, L + N, D): SDPA wants heads before the sequence
    q, k, v = (
        torch.cat([t, i], dim=1).transpose(1, 2) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))
    )
    mask = None
    if txt_mask is not None:
        B, N = img_q.shape[:2]
        keys = torch.cat([txt_mask.bool(), torch.ones(B, N, dtype=torch.bool, device=txt_mask.device)], dim=1)
        mask = keys[:, None, None, :]  # (B, 1, 1, L + N): the same keys hidden from every head and query
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L + N, D)
    out = out.transpose(1, 2).flatten(2)  # (B, L + N, H * D)
    return out[:, L:], out[:, :L]

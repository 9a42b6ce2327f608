"""A typical wrong solution: the padding mask laid over the queries (B, 1, S, 1) instead of the keys."""

import torch
import torch.nn.functional as F


def joint_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_mask=None):
    L = txt_q.shape[1]
    q, k, v = (
        torch.cat([t, i], dim=1).transpose(1, 2) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))
    )
    mask = None
    if txt_mask is not None:
        B, N = img_q.shape[:2]
        mask = torch.cat([txt_mask.bool(), torch.ones(B, N, dtype=torch.bool)], dim=1)[:, None, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    return out[:, L:], out[:, :L]

"""A typical wrong solution: the image first in the joint sequence, but the mask and the split as [text, image]."""

import torch
import torch.nn.functional as F


def joint_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_mask=None):
    L = txt_q.shape[1]
    q, k, v = (
        torch.cat([i, t], dim=1).transpose(1, 2) for i, t in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v))
    )
    mask = None
    if txt_mask is not None:
        B, N = img_q.shape[:2]
        mask = torch.cat([txt_mask.bool(), torch.ones(B, N, dtype=torch.bool)], dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    return out[:, L:], out[:, :L]

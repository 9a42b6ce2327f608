"""A typical wrong solution: the text mask is never applied, so padded text keys are attended."""

import torch
import torch.nn.functional as F


def joint_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_mask=None):
    L = txt_q.shape[1]
    q, k, v = (
        torch.cat([t, i], dim=1).transpose(1, 2) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))
    )
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return out[:, L:], out[:, :L]

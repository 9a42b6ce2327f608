"""A typical wrong solution: the cache keeps the chunk's first frames instead of the last ones."""

import torch
import torch.nn.functional as F


def causal_conv3d(x, weight, bias, padding, past=None):
    pt, ph, pw = padding
    seen = x if past is None else torch.cat([past, x], dim=2)
    zeros = 2 * pt - (seen.shape[2] - x.shape[2])
    return F.conv3d(F.pad(seen, (pw, pw, ph, ph, zeros, 0)), weight, bias), x[:, :, : 2 * pt]

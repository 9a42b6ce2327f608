"""Reference solution of assignments/causal_conv.py (the instructor's; `make student` leaves this folder out)."""

import torch
import torch.nn.functional as F


def causal_conv3d(x, weight, bias, padding, past=None):
    pt, ph, pw = padding
    seen = x if past is None else torch.cat([past, x], dim=2)  # (B, C, T + len(past), H, W)
    keep = seen[:, :, seen.shape[2] - 2 * pt :]  # the last 2 * pt frames (all of them if fewer were seen)
    zeros = 2 * pt - (seen.shape[2] - x.shape[2])  # the past frames not given by the cache are zeros
    y = F.conv3d(F.pad(seen, (pw, pw, ph, ph, zeros, 0)), weight, bias)  # F.pad: last dim first
    return y, keep

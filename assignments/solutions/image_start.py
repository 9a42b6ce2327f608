"""Reference solution of assignments/image_start.py."""

import math

import torch.nn.functional as F


def kept_sigmas(sigmas, strength):
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    steps = len(sigmas) - 1
    dropped = int(steps - steps * strength)  # steps * strength <= steps, so this is >= 0
    if dropped >= steps:
        raise ValueError(f"strength {strength!r} leaves none of the {steps} steps: raise it")
    return sigmas[dropped:]


def sdedit_start(x0, noise, sigmas, strength):
    sigma = kept_sigmas(sigmas, strength)[0].to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def mask_tokens(mask, channels, patch=2, scale=8):
    B, _, H, W = mask.shape
    h, w = H // scale, W // scale
    grid = F.interpolate(mask.float(), size=(h, w), mode="nearest").expand(B, channels, h, w)  # (B, C, h, w)
    tokens = grid.reshape(B, channels, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(B, (h // patch) * (w // patch), channels * patch * patch)  # (B, N, C p²)


def blend(x, x0, noise, repaint, sigmas, i):
    sigma = sigmas[i + 1].to(x0.dtype)  # where the step has taken x: 0 after the last one, so known = x0
    known = (1 - sigma) * x0 + sigma * noise
    return (1 - repaint) * known + repaint * x

"""An exponential moving average of the trained weights (`--use_ema`, as diffusers' training scripts have it).

SGD's last iterate jitters around the minimum by an amount set by the learning rate; the average of the recent
iterates sits closer to it (Polyak and Juditsky 1992; every large diffusion model samples from EMA weights,
e.g. Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"). After each
optimizer step

    ema <- ema + (1 - d) (weight - ema),     d = min(decay, step / (9 + step)), and 0 after step 1

The warmup of d (diffusers' EMAModel's default: the same numbers) lets the average forget the weights it
started from in the first steps, instead of carrying them for 1 / (1 - decay) steps. The average is kept in fp32 beside the weights
it follows, by name: {name: tensor}.
"""

from __future__ import annotations

import contextlib

import torch


def decay_at(step: int, decay: float) -> float:
    """The averaging weight after optimizer step `step` (from 1)."""
    return 0.0 if step <= 1 else min(decay, step / (9 + step))


def start(trainable: dict) -> dict:
    """The average before any step: a copy of the weights, in fp32."""
    return {name: p.detach().float().clone() for name, p in trainable.items()}


@torch.no_grad()
def update(ema: dict, trainable: dict, step: int, decay: float) -> None:
    """One step of the average towards the current weights (in place)."""
    weight = 1 - decay_at(step, decay)
    for name, average in ema.items():
        average.lerp_(trainable[name].detach().float(), weight)


@contextlib.contextmanager
def swapped_in(trainable: dict, ema: dict | None):
    """Inside: the model's weights are the average (to sample or save it); after: as trained again. No-op
    without an average."""
    if not ema:
        yield
        return
    trained = {name: p.detach().clone() for name, p in trainable.items()}
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(ema[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(trained[name])

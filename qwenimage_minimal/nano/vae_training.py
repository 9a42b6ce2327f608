"""The nano VAE, trained from scratch on the scenes: reconstruction of object-centred crops plus a small KL
term, then the per-channel statistics of its latents (the official VAE's config carries the same two vectors).
recipe.py runs it; the VAE itself is vae.py's, at the nano size."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import images
from ..vae import QwenImageVAE
from . import scenes

NEAR_DETERMINISTIC_LOGVAR = -8.0  # initial posterior log-variance: the decoder starts on clean latents


def object_mask(pictures: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W) bool: the pixels that differ from the picture's background (its
    top-left pixel: no object reaches a corner; for a picture with a textured background, most pixels)."""
    background = pictures[:, :, :1, :1]  # (N, 3, 1, 1)
    return (pictures - background).abs().amax(1) > 0.05


def other_pictures(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n pictures unlike the scenes, as (n, 3, size, size) in [-1, 1]: a background of any colour (light ones
    the most), a gradient or a smooth noise texture, and one to four shapes (the scenes' four, stars, ellipses, random polygons) in any
    colour, anywhere, of any size. Trained on beside the scenes, they keep the VAE general, as the official
    one is: a VAE that only ever saw the eight scene colours reconstructs a black star as an orange one, and a
    LoRA that teaches a new colour then has nothing to teach it with."""
    rng = random.Random(seed)
    numbers = np.random.default_rng(seed)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:  # a light background, like the scenes'
            image = Image.new("RGB", (size, size), tuple(rng.randrange(200, 256) for _ in range(3)))
        elif kind < 0.75:
            image = Image.new("RGB", (size, size), colour())
        elif kind < 0.92:  # a linear gradient between two colours, in any direction
            a, b = np.array(colour(), np.float32), np.array(colour(), np.float32)
            angle = rng.uniform(0, 2 * math.pi)
            ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
            t = ((xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)) / math.sqrt(2) + 0.5
            image = Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))
        else:  # smooth noise around a colour: a few random values per side, upsampled
            cells = rng.choice((2, 4, 8))
            base = np.array(colour(), np.float32) + numbers.normal(0, 25, (cells, cells, 3))
            image = Image.fromarray(base.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 24, size / 4)
            shape, fill = (
                rng.choice(("circle", "square", "triangle", "diamond", "star", "ellipse", "polygon")),
                colour(),
            )
            if shape in scenes.SHAPES + scenes.NEW_SHAPES:
                scenes.draw_shape(draw, shape, cx, cy, r, fill)
            elif shape == "ellipse":
                draw.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=fill)
            else:
                corners = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 7)))
                draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners], fill=fill)
        out.append(images.to_tensor(image))
    return torch.cat(out)


def object_crops(pictures, mask, crop: int, batch: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random crop x crop windows, each around a random object pixel (jittered by a quarter crop):
    most of a scene is background, which a VAE learns in seconds; the shapes' edges are the hard part."""
    n, _, height, width = pictures.shape
    xs, ms = [], []
    for i in torch.randint(0, n, (batch,), generator=generator).tolist():
        ys, xs_ = mask[i].nonzero(as_tuple=True)
        k = int(torch.randint(0, len(ys), (1,), generator=generator)) if len(ys) else None
        cy, cx = (int(ys[k]), int(xs_[k])) if k is not None else (height // 2, width // 2)
        jy, jx = (torch.randint(-crop // 4, crop // 4 + 1, (2,), generator=generator)).tolist()
        top = min(max(cy - crop // 2 + jy, 0), height - crop)
        left = min(max(cx - crop // 2 + jx, 0), width - crop)
        xs.append(pictures[i, :, top : top + crop, left : left + crop])
        ms.append(mask[i, top : top + crop, left : left + crop])
    return torch.stack(xs), torch.stack(ms)


def vae_loss(vae: QwenImageVAE, x, mask, generator, object_weight: float, kl_weight: float):
    """Reconstruction (L1 + L2, object pixels weighted up) of a posterior sample + kl_weight * KL to N(0, I).
    -> (loss, reconstruction term, KL) for the log."""
    mean, logvar = vae.encode_moments(x).chunk(2, dim=1)  # (B, z, h, w) each
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise  # reparameterised sample
    error = vae.decode_unclamped(z) - x  # (B, 3, H, W)
    w = 1 + object_weight * mask[:, None].to(x.dtype)
    reconstruction = ((error.abs() + error.pow(2)) * w).sum() / (w.sum() * 3)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return reconstruction + kl_weight * kl, reconstruction, kl


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((reconstruction - target) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def train_vae(
    vae: QwenImageVAE,
    pictures: torch.Tensor,
    held_out: dict,
    steps: int,
    batch: int = 16,
    crop: int = 64,
    lr: float = 1e-3,
    object_weight: float = 10.0,
    kl_weight: float = 1e-6,
    seed: int = 0,
    eval_every: int = 100,
    log=print,
) -> list[dict]:
    """Train `vae` in place on `pictures` (N, 3, H, W) in [-1, 1]; every `eval_every` steps the reconstruction
    PSNR of each held-out set {name: pictures} (from the posterior mean, as the pipelines encode) is logged as
    "<name>_psnr". -> the log rows.

    AdamW, warmup then cosine decay. The posterior starts nearly deterministic (NEAR_DETERMINISTIC_LOGVAR):
    with the default init its noise (std 1) would drown the latents the decoder learns from."""
    generator = torch.Generator().manual_seed(seed)
    mask = object_mask(pictures)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.z_dim :] += NEAR_DETERMINISTIC_LOGVAR
        vae.quant_conv.weight[vae.config.z_dim :] *= 0.01
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    # 50 steps of warmup, then a cosine down to a tenth: the loss is noisy at a constant rate (held-out
    # PSNR swings by 2-3 dB between evaluations), the decay settles it
    shape = lambda s: min(1.0, (s + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
    rows = []
    for step in range(1, steps + 1):
        x, m = object_crops(pictures, mask, crop, batch, generator)
        loss, reconstruction, kl = vae_loss(vae.train(), x, m, generator, object_weight, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # a picture of strong colours kicks hard
        optimizer.step()
        schedule.step()
        row = {"step": step, "loss": loss.item(), "reconstruction": reconstruction.item(), "kl": kl.item()}
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                for name, x in held_out.items():
                    row[f"{name}_psnr"] = psnr(vae.eval().decode(vae.encode(x).mean), x)
            scores = ", ".join(f"{name} {row[f'{name}_psnr']:.2f} dB" for name in held_out)
            log(f"vae step {step}: loss {row['loss']:.4f}, PSNR {scores}")
        rows.append(row)
    return rows


@torch.no_grad()
def latent_statistics(vae: QwenImageVAE, pictures: torch.Tensor, batch: int = 64) -> tuple[tuple, tuple]:
    """Per-channel mean and standard deviation of the posterior means over `pictures`: the official VAE's
    config carries the same two vectors (latents_mean, latents_std), with which the pipelines normalise
    latents to about unit scale before the MMDiT sees them. -> (means, stds) as tuples of floats."""
    z = torch.cat(
        [vae.encode(pictures[i : i + batch]).mean for i in range(0, len(pictures), batch)]
    )  # (N, C, h, w)
    return tuple(z.mean((0, 2, 3)).tolist()), tuple(z.std((0, 2, 3)).tolist())

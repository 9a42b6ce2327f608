"""The nano VAE, trained from scratch on the scenes: reconstruction of object-centred crops plus a small KL
term, then the per-channel statistics of its latents (the official VAE's config carries the same two vectors).
recipe.py runs it; the VAE itself is vae.py's, at the nano size."""

from __future__ import annotations

import math

import torch

from ..vae import QwenImageVAE

NEAR_DETERMINISTIC_LOGVAR = -8.0  # initial posterior log-variance: the decoder starts on clean latents


def object_mask(pictures: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W) bool: the pixels that are not background."""
    return (pictures - background.view(1, 3, 1, 1)).abs().amax(1) > 0.05


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
    held_out: torch.Tensor,
    background,
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
    """Train `vae` in place on `pictures` (N, 3, H, W) in [-1, 1]; every `eval_every` steps the held-out
    reconstruction PSNR (from the posterior mean, as the pipelines encode) is logged. -> the log rows.

    AdamW, warmup then cosine decay. The posterior starts nearly deterministic (NEAR_DETERMINISTIC_LOGVAR):
    with the default init its noise (std 1) would drown the latents the decoder learns from."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.as_tensor(background, dtype=pictures.dtype)
    mask = object_mask(pictures, background)
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
        optimizer.step()
        schedule.step()
        row = {"step": step, "loss": loss.item(), "reconstruction": reconstruction.item(), "kl": kl.item()}
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                row["held_out_psnr"] = psnr(vae.eval().decode(vae.encode(held_out).mean), held_out)
            log(f"vae step {step}: loss {row['loss']:.4f}, held-out PSNR {row['held_out_psnr']:.2f} dB")
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

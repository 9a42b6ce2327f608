"""Reference solution of assignments/flow_loss.py (the instructor's; `make student` leaves this folder out)."""

import torch


def logit_normal_u(n, logit_mean=0.0, logit_std=1.0):
    return torch.sigmoid(logit_mean + logit_std * n)


def training_sigmas(u, num_train_timesteps=1000):
    index = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)  # 0 = pure noise
    return (num_train_timesteps - index).float() / num_train_timesteps  # t / 1000, t = 1000 - index


def noisy_latents(x0, noise, sigma):
    sigma = sigma.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))  # (B, 1, 1, 1): one level per sample
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0, noise):
    return noise - x0  # d/dsigma [(1 - sigma) x0 + sigma noise]


def flow_matching_loss(prediction, x0, noise, weight=None):
    B = x0.shape[0]
    error = (prediction.float() - velocity_target(x0, noise).float()) ** 2  # (B, C, h, w)
    per_sample = error.reshape(B, -1).mean(1)  # (B,)
    if weight is not None:
        per_sample = weight.float() * per_sample
    return per_sample.mean()

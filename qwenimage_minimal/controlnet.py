"""The Qwen-Image ControlNet: a few of the MMDiT's own blocks that read a control image and steer the MMDiT.

    img (B, N, 64)       the noisy latents the MMDiT denoises (packed tokens)
    control (B, N, 64+e) the control image's packed latents (a pose, edges, depth...); for inpainting also
                         its mask, 1 channel x 2x2 patch = e = 4 extra channels (`extra_condition_channels`)

    x = img_in(img) + controlnet_x_embedder(control)      (B, N, dim)   the embedder starts at zero
    txt, sigma -> txt_in(txt_norm(txt)), temb             as in the MMDiT
    K x dual-stream block (mmdit.DualStreamBlock): x_k    (B, N, dim)   after block k
    residual_k = controlnet_blocks[k](x_k) * scale        (B, N, dim)   zero-initialised Linears

The MMDiT adds residual_k to its image stream after its blocks (mmdit.MMDiT.forward's
`controlnet_block_samples`): with K = 5 and 60 blocks, residual k after blocks 12k .. 12k + 11. Because the
embedder and the output Linears start at zero, a freshly made ControlNet changes nothing and training
grows its influence from there. Parameter names equal diffusers' `QwenImageControlNetModel`, so an official
ControlNet folder (config.json + diffusion_pytorch_model.safetensors, e.g. InstantX's) loads strictly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import mmdit, weights


@dataclass
class ControlNetConfig:
    """The fields of diffusers' QwenImageControlNetModel config.json (defaults: the MMDiT's, 60 blocks;
    InstantX's Qwen-Image-ControlNet-Union has num_layers 5)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16  # in the config; a ControlNet has no output projection
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    extra_condition_channels: int = 0  # inpainting: the mask's packed channels beside the control latents

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim={self.attention_head_dim}"
            )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def block_config(self) -> mmdit.MMDiTConfig:
        """The MMDiT config whose dual-stream blocks these are."""
        fields = {k: v for k, v in asdict(self).items() if k != "extra_condition_channels"}
        return mmdit.MMDiTConfig(**{**fields, "out_channels": self.out_channels or 16})

    def to_json(self) -> dict:
        return {
            "_class_name": "QwenImageControlNetModel",
            "_diffusers_version": "0.42.1",
            **asdict(self),
            "axes_dims_rope": list(self.axes_dims_rope),
        }


class QwenImageControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        dim, blocks = config.dim, config.block_config()
        self.block_config = blocks  # the blocks' and RoPE's settings (theta, eps), as the MMDiT's
        self.time_text_embed = mmdit.TimestepEmbedding(dim)
        self.txt_norm = mmdit.RMSNorm(config.joint_attention_dim, eps=blocks.eps)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            mmdit.DualStreamBlock(blocks) for _ in range(config.num_layers)
        )
        # zero-initialised as in training's start (a loaded checkpoint overwrites them)
        self.controlnet_blocks = nn.ModuleList(zero_linear(dim, dim) for _ in range(config.num_layers))
        self.controlnet_x_embedder = zero_linear(config.in_channels + config.extra_condition_channels, dim)
        self._rope_cache = {}

    def forward(self, img, control, txt, txt_mask, sigma, img_shapes, conditioning_scale: float = 1.0):
        """
        img         (B, N, in_channels) the MMDiT's packed latents at this step
        control     (B, N, in_channels + extra_condition_channels) the packed control latents
        txt, txt_mask, sigma, img_shapes: as mmdit.MMDiT.forward (one image, no reference tokens)
        returns     a list of num_layers residuals (B, N, dim), each times conditioning_scale
        """
        dtype = self.img_in.weight.dtype
        B, N, _ = img.shape
        sigma = torch.as_tensor(sigma, device=img.device).reshape(-1).expand(B)
        x = self.img_in(img.to(dtype)) + self.controlnet_x_embedder(control.to(dtype))  # (B, N, dim)
        temb = self.time_text_embed(sigma.to(dtype), dtype)  # (B, dim)
        txt = self.txt_in(self.txt_norm(txt.to(dtype)))  # (B, L, dim)
        img_rope, txt_rope = mmdit.cached_rope_tables(
            self._rope_cache,
            [tuple(int(v) for v in s) for s in img_shapes],
            txt.shape[1],
            self.block_config,
            img.device,
        )  # (N, Dh/2), (L, Dh/2) complex
        key_mask = mmdit.joint_key_mask(None if txt_mask is None else txt_mask.to(img.device), N)
        residuals = []
        for block, project in zip(self.transformer_blocks, self.controlnet_blocks):
            x, txt = block(x, txt, temb, img_rope, txt_rope, key_mask)
            residuals.append(project(x) * conditioning_scale)  # (B, N, dim)
        return residuals


def zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    linear = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def check_fits(config: ControlNetConfig, transformer: mmdit.MMDiTConfig, what: str = "controlnet") -> None:
    """A ControlNet steers only the MMDiT it was made for: the same width (its residuals join the image
    stream), patch, latent channels and text width. One sentence naming the mismatch and the fix."""
    pairs = (
        ("width", config.dim, transformer.dim),
        ("patch_size", config.patch_size, transformer.patch_size),
        ("in_channels", config.in_channels, transformer.in_channels),
        ("joint_attention_dim", config.joint_attention_dim, transformer.joint_attention_dim),
    )
    for name, theirs, ours in pairs:
        if theirs != ours:
            raise weights.CheckpointError(
                f"{what}: this ControlNet was made for a transformer with {name} {theirs}, but this "
                f"pipeline's transformer has {name} {ours}: use a ControlNet trained for this model"
            )


REQUIRED_FIELDS = mmdit.REQUIRED_FIELDS
CLASS_NAME = "QwenImageControlNetModel"


def config_from_folder(path) -> ControlNetConfig:
    raw = weights.read_config(path)
    if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise weights.CheckpointError(
            f"{path}/config.json names {raw['_class_name']!r}: not a Qwen-Image ControlNet ({CLASS_NAME})"
        )
    extra = raw.get("extra_condition_channels", 0)  # may be 0, which config_from_json's size check refuses
    if type(extra) is not int or extra < 0:
        raise weights.CheckpointError(
            f"{path}/config.json: extra_condition_channels={extra!r} must be a whole number >= 0"
        )
    fields = {k: v for k, v in raw.items() if k != "extra_condition_channels"}
    config = weights.config_from_json(ControlNetConfig, fields, path, REQUIRED_FIELDS)
    config.extra_condition_channels = extra
    return config


def load(path, device=None, dtype=None, check_finite: bool = True) -> QwenImageControlNet:
    """Load a ControlNet folder in diffusers' layout (config.json + safetensors, sharded or not), strictly."""
    config = config_from_folder(path)
    counts = ("num_layers", config.num_layers)
    return weights.load_weights(
        lambda: QwenImageControlNet(config),
        path,
        mmdit.WEIGHTS_STEM,
        device=device,
        dtype=dtype,
        block_counts={"transformer_blocks": counts, "controlnet_blocks": counts},
        check_finite=check_finite,
    )

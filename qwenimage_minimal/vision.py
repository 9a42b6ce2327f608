"""The vision half of Qwen2.5-VL, which Qwen-Image-Edit uses to *read* the input image.

Edit conditions the MMDiT on the instruction encoded together with the image: the image goes
through this vision tower, its features replace the `<|image_pad|>` tokens of the prompt
(prompts.py), and the language model (text_encoder.py) runs over both. The pixels arrive as 14x14
patches from the image processor (images.preprocess), each 2x2 group of neighbours consecutive.

The vision transformer (32 blocks, 1280-d, 16 heads):
    patches -> Conv3d patch embedding (a linear map of each 1176-value patch) -> (N, 1280)
    2-D rotary embedding: half of each head's frequencies rotate with the patch row, half
    with the column ("rotate half" layout, as in the language model)
    window attention: most blocks attend only inside 112x112 px windows (8x8 patches); the
    blocks in `fullatt_block_indexes` (7, 15, 23, 31) attend over the whole image. Tokens are
    reordered once so that each window is a contiguous run, and put back after the merger.
    patch merger: RMSNorm, each 2x2 group concatenated (4 x 1280) -> MLP -> (N/4, 3584)

Loading: the tower's weights live in the text encoder's files under `visual.*` (legacy layout)
or `model.visual.*` (transformers 5.x), its config under `vision_config`. The 3-D position ids
that the language model gives image tokens are in text_encoder.py, beside the rest of the
multimodal RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .text_encoder import MLP, RMSNorm, rotate_half  # the same pieces as the language model's

# ---------------------------------------------------------------------------------------------
# The vision transformer
# ---------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """Defaults are Qwen2.5-VL-7B's vision tower (text_encoder/config.json, `vision_config`)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 3584  # the language model's width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(self.fullatt_block_indexes)
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (2-D rotary embedding)")

    def to_json(self) -> dict:
        """The `vision_config` entry of text_encoder/config.json (transformers' field names)."""
        return {
            "depth": self.depth,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "out_hidden_size": self.out_hidden_size,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "hidden_act": "silu",
            "tokens_per_second": 2,
        }


def patch_positions(grid_thw, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's order (2x2 groups consecutive) -> (N, 2)."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        grouped = lambda g: (
            g.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(1, 2).flatten()
        )
        out.append(torch.stack([grouped(rows), grouped(cols)], dim=-1).repeat(t, 1))
    return torch.cat(out)


def rope_cos_sin(positions: torch.Tensor, config: VisionConfig):
    """(N, 2) patch (row, col) -> cos, sin (N, head_dim) in fp32.

    head_dim/4 frequencies, each used twice: the first half of the angles follows the row, the
    second half the column, and the whole is repeated for the "rotate half" pairing."""
    half = config.head_dim // 2  # per axis: a 1-D RoPE over head_dim/2 channels
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    angles = positions[..., None].float() * inv_freq  # (N, 2, head_dim/4)
    angles = angles.flatten(1)  # (N, head_dim/2): [rows | cols]
    emb = torch.cat([angles, angles], dim=-1)  # (N, head_dim)
    return emb.cos(), emb.sin()


def window_order(grid_thw, config: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Order of the merged 2x2 groups that makes every attention window contiguous, and the window lengths.

    A window is window_size px = 112 / 14 / 2 = 4 x 4 merged groups (8 x 8 patches). Windows tile
    each image from its top-left corner; those at the right and bottom edges are smaller.
    Returns (order (N/4,) indices into the processor's group order, lengths of the windows in patches)."""
    m = config.spatial_merge_size
    win = config.window_size // m // config.patch_size
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // m, w // m
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in index:
            for r in range(0, gh, win):
                for c in range(0, gw, win):
                    window = frame[r : r + win, c : c + win].flatten()
                    order.append(window + offset)
                    lengths.append(len(window) * m * m)
        offset += t * gh * gw
    return torch.cat(order), lengths


def image_lengths(grid_thw) -> list[int]:
    """The full-attention blocks attend within each frame of each image: its number of patches."""
    return [h * w for t, h, w in grid_thw for _ in range(t)]


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride: one linear map per (3, 2, 14, 14) patch."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.shape = (c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(
            c.in_channels, c.hidden_size, kernel_size=self.shape[1:], stride=self.shape[1:], bias=False
        )

    def forward(self, pixel_values):
        x = pixel_values.view(-1, *self.shape).to(self.proj.weight.dtype)  # (N, 3, 2, 14, 14)
        return self.proj(x).flatten(1)  # (N, hidden)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x, cos, sin, lengths: list[int]):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, heads, head_dim) each
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)  # rotated in fp32
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, N, head_dim)
        # Attention only inside each segment (a window, or a whole image): one call per segment.
        out = torch.cat(
            [
                F.scaled_dot_product_attention(qs, ks, vs)
                for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
            ],
            dim=2,
        )
        return self.proj(out[0].transpose(0, 1).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.norm2 = RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=True)  # SwiGLU with biases

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate each 2x2 group, MLP to the language model's width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        group = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(group, group), nn.GELU(), nn.Linear(group, config.out_hidden_size))

    def forward(self, x):
        group = self.mlp[0].in_features
        return self.mlp(self.ln_q(x).view(-1, group))  # (N, hidden) -> (N/4, out_hidden)


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """pixel_values (N, 1176) of one or more images, grid_thw [(t, h, w), ...] -> features (N/4, out_hidden).

        Features come out in the processor's order: image after image, 2x2 group after group."""
        c = self.config
        grid_thw = [
            tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)
        ]
        n = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != n:
            raise ValueError(
                f"pixel_values must be ({n}, {c.in_channels * c.temporal_patch_size * c.patch_size**2})"
                f" for grid_thw {grid_thw}, got {tuple(pixel_values.shape)}"
            )
        unit = c.spatial_merge_size**2
        order, window_lengths = window_order(grid_thw, c)
        regroup = lambda t: t.view(n // unit, unit, -1)[order].view(n, -1)  # windows made contiguous

        x = regroup(self.patch_embed(pixel_values))  # (N, hidden)
        cos, sin = (
            regroup(t).to(x.device) for t in rope_cos_sin(patch_positions(grid_thw, c.spatial_merge_size), c)
        )
        full_lengths = image_lengths(grid_thw)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_lengths if i in c.fullatt_block_indexes else window_lengths)
        merged = self.merger(x)  # (N/4, out_hidden)
        return merged[torch.argsort(order)]  # back to the processor's order


# ---------------------------------------------------------------------------------------------
# Loading the tower from text_encoder/
# ---------------------------------------------------------------------------------------------


def config_from_json(raw: dict, folder="<config>") -> VisionConfig:
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise weights.CheckpointError(
            f"{folder}/config.json has no vision_config: it is not a Qwen2.5-VL text encoder"
        )
    vision = dict(vision)
    if "in_chans" in vision:  # the official (transformers 4.x) spelling
        vision.setdefault("in_channels", vision.pop("in_chans"))
    theta = (vision.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        vision["rope_theta"] = theta
    if vision.get("hidden_act", "silu") != "silu":
        raise weights.CheckpointError(
            f"{folder}/config.json: vision hidden_act {vision['hidden_act']!r}; Qwen2.5-VL's tower uses silu"
        )
    required = (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "out_hidden_size",
        "fullatt_block_indexes",
    )
    return weights.config_from_json(VisionConfig, vision, folder, required)


def checkpoint_name_to_ours(name: str) -> str | None:
    """visual.blocks.0.attn.qkv.weight (legacy) or model.visual.blocks.0... (5.x) -> blocks.0.attn.qkv.weight."""
    for prefix in ("model.visual.", "visual."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None  # the language model: not part of the tower


def load(path, device=None, dtype=None, check_finite: bool = True) -> VisionTower:
    """Load the vision tower from an official `text_encoder/` folder."""
    config = config_from_json(weights.read_config(path), path)
    return weights.load_weights(
        lambda: VisionTower(config),
        path,
        "model",
        device=device,
        dtype=dtype,
        rename=checkpoint_name_to_ours,
        check_finite=check_finite,
        block_counts={"blocks": ("depth", config.depth)},
    )

"""The vision half of Qwen2.5-VL, which Qwen-Image-Edit uses to *read* the input image.

Edit conditions the MMDiT on the instruction encoded together with the image: the image goes
through this vision tower, its features replace the `<|image_pad|>` tokens of the prompt, and the
language model (text_encoder.py) runs over both. Three parts, top to bottom:

1. The image processor (what transformers' Qwen2VLImageProcessor does, in numpy and PIL):
       any image -> RGB -> resized so both sides are multiples of 28 (= 14 px patch x 2x2 merge)
       with the area in [min_pixels, max_pixels] -> bicubic -> /255 -> CLIP mean/std
       -> the frame repeated to the temporal patch size 2 (the tower is also a video model)
       -> 14x14 patches, listed so that each 2x2 group of neighbours is consecutive
       -> pixel_values (h*w, 3*2*14*14 = 1176) and grid_thw = (1, h, w) in patches.
   The prompt then holds (h/2)(w/2) `<|image_pad|>` tokens for this image: one per 2x2 group.

2. The vision transformer (32 blocks, 1280-d, 16 heads):
       patches -> Conv3d patch embedding (a linear map of each 1176-value patch) -> (N, 1280)
       2-D rotary embedding: half of each head's frequencies rotate with the patch row, half
       with the column ("rotate half" layout, as in the language model)
       window attention: most blocks attend only inside 112x112 px windows (8x8 patches); the
       blocks in `fullatt_block_indexes` (7, 15, 23, 31) attend over the whole image. Tokens are
       reordered once so that each window is a contiguous run, and put back after the merger.
       patch merger: RMSNorm, each 2x2 group concatenated (4 x 1280) -> MLP -> (N/4, 3584)

3. Loading: the tower's weights live in the text encoder's files under `visual.*` (legacy layout)
   or `model.visual.*` (transformers 5.x), its config under `vision_config`.

The 3-D position ids that the language model gives image tokens are in text_encoder.py, beside
the rest of the multimodal RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .text_encoder import MLP, RMSNorm, rotate_half   # the same pieces as the language model's

# ---------------------------------------------------------------------------------------------
# 1. The image processor
# ---------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessorConfig:
    """Defaults are Qwen2.5-VL's preprocessor_config.json, which Edit checkpoints carry in processor/."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384          # 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


def processor_config_from_json(raw: dict, path="<preprocessor_config.json>") -> ImageProcessorConfig:
    """Both forms: `min_pixels`/`max_pixels` (official files) or `size: {shortest_edge, longest_edge}` (5.x)."""
    size = raw.get("size") or {}
    fields = dict(min_pixels=raw.get("min_pixels", size.get("shortest_edge")),
                  max_pixels=raw.get("max_pixels", size.get("longest_edge")))
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
        fields[key] = raw.get(key)
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ckpt.CheckpointError(f"{path} is missing {missing}")
    resample = raw.get("resample", 3)
    if resample != 3:
        raise ckpt.CheckpointError(f"{path}: resample={resample}; only 3 (bicubic), the official value, is supported")
    return ImageProcessorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_processor_config(folder) -> ImageProcessorConfig:
    """Read an Edit checkpoint's `processor/preprocessor_config.json`."""
    return processor_config_from_json(ckpt.read_config(folder, "preprocessor_config.json"),
                                      Path(folder) / "preprocessor_config.json")


def to_rgb(image, name: str = "image"):
    """A PIL image, an (H, W, C) numpy array or a (C, H, W) / (1, C, H, W) tensor -> PIL RGB image.

    Arrays and tensors hold uint8 0..255 or floats in [0, 1] (as in diffusers), with 1, 3 or 4
    channels. Transparency (RGBA, LA, palette images with a transparent colour) is composited on
    white, as transformers' processor does; palette ("P") and grey images are converted.
    Floats are rounded to 8 bits: the vision tower's processor works on 8-bit images anyway."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        raise TypeError(f"{name} is a path ({image!r}); open it first: PIL.Image.open(path)")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"{name}: a tensor must be (C, H, W) or (1, C, H, W) with C in 1, 3, 4, "
                             f"got {tuple(image.shape)}")
        image = t.permute(1, 2, 0).float().numpy() if t.is_floating_point() else t.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{name}: an array must be (H, W) or (H, W, C) with C in 1, 3, 4, got {image.shape}")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{name} is empty: {image.shape}")
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ValueError(f"{name}: float arrays/tensors must hold values in [0, 1], got "
                                 f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]")
            a = (a * 255).round()
        elif a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{name}: integer arrays must hold 0..255, got [{a.min()}, {a.max()}]")
        a = a.astype(np.uint8)
        image = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode={1: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1]])
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} has size {image.size}: it is empty")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 16384) -> tuple[int, int]:
    """The size the vision tower sees: both sides multiples of `factor`, close to the input's
    aspect ratio, the area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"the image's aspect ratio {max(height, width) / min(height, width):.0f}:1 is over 200:1")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(image, config: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[torch.Tensor, tuple]:
    """image -> (pixel_values (h*w, C*T*P*P) float32, grid_thw (1, h, w) in patches)."""
    from PIL import Image
    c = config
    image = to_rgb(image)
    H, W = smart_resize(image.height, image.width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
    pixels = np.asarray(image.resize((W, H), Image.BICUBIC))                    # (H, W, 3) uint8
    # Rescale in float64 then cast, normalise in float32: the same roundings as transformers.
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(c.image_mean, np.float32)) / np.array(c.image_std, np.float32)
    x = x.transpose(2, 0, 1)                                                     # (3, H, W)

    p, m, T = c.patch_size, c.merge_size, c.temporal_patch_size
    gh, gw = H // p, W // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                     # (gh/m, gw/m, m, m, 3, p, p): 2x2 groups together
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, p, p))  # one image = T identical frames
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * T * p * p)), (1, gh, gw)


def image_token_count(grid_thw, merge_size: int = 2) -> int:
    """How many `<|image_pad|>` tokens an image of this patch grid takes: one per merged 2x2 group."""
    t, h, w = grid_thw
    return t * h * w // merge_size ** 2


# ---------------------------------------------------------------------------------------------
# 2. The vision transformer
# ---------------------------------------------------------------------------------------------

@dataclass
class VisionConfig:
    """Defaults are Qwen2.5-VL-7B's vision tower (text_encoder/config.json, `vision_config`)."""
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 3584               # the language model's width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112                    # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(self.fullatt_block_indexes)
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (2-D rotary embedding)")


def patch_positions(grid_thw, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's order (2x2 groups consecutive) -> (N, 2)."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        grouped = lambda g: g.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(1, 2).flatten()
        out.append(torch.stack([grouped(rows), grouped(cols)], dim=-1).repeat(t, 1))
    return torch.cat(out)


def rope_cos_sin(positions: torch.Tensor, config: VisionConfig):
    """(N, 2) patch (row, col) -> cos, sin (N, head_dim) in fp32.

    head_dim/4 frequencies, each used twice: the first half of the angles follows the row, the
    second half the column, and the whole is repeated for the "rotate half" pairing."""
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
    angles = positions[..., None].float() * inv_freq           # (N, 2, head_dim/4)
    angles = angles.flatten(1)                                 # (N, head_dim/2): [rows | cols]
    emb = torch.cat([angles, angles], dim=-1)                  # (N, head_dim)
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
                    window = frame[r:r + win, c:c + win].flatten()
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
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=self.shape[1:], stride=self.shape[1:],
                              bias=False)

    def forward(self, pixel_values):
        x = pixel_values.view(-1, *self.shape).to(self.proj.weight.dtype)   # (N, 3, 2, 14, 14)
        return self.proj(x).flatten(1)                                      # (N, hidden)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x, cos, sin, lengths: list[int]):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)    # (N, heads, head_dim) each
        cos, sin = cos[:, None], sin[:, None]                              # broadcast over heads
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)    # rotated in fp32
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))              # (1, heads, N, head_dim)
        # Attention only inside each segment (a window, or a whole image): one call per segment.
        out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
                         zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))], dim=2)
        return self.proj(out[0].transpose(0, 1).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.norm2 = RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=True)   # SwiGLU with biases

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate each 2x2 group, MLP to the language model's width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        group = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(group, group), nn.GELU(), nn.Linear(group, config.out_hidden_size))

    def forward(self, x):
        group = self.mlp[0].in_features
        return self.mlp(self.ln_q(x).view(-1, group))            # (N, hidden) -> (N/4, out_hidden)


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
        grid_thw = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        n = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values must be ({n}, {c.in_channels * c.temporal_patch_size * c.patch_size ** 2})"
                             f" for grid_thw {grid_thw}, got {tuple(pixel_values.shape)}")
        unit = c.spatial_merge_size ** 2
        order, window_lengths = window_order(grid_thw, c)
        regroup = lambda t: t.view(n // unit, unit, -1)[order].view(n, -1)    # windows made contiguous

        x = regroup(self.patch_embed(pixel_values))                               # (N, hidden)
        cos, sin = (regroup(t).to(x.device) for t in rope_cos_sin(patch_positions(grid_thw, c.spatial_merge_size), c))
        full_lengths = image_lengths(grid_thw)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_lengths if i in c.fullatt_block_indexes else window_lengths)
        merged = self.merger(x)                                                   # (N/4, out_hidden)
        return merged[torch.argsort(order)]                                       # back to the processor's order


# ---------------------------------------------------------------------------------------------
# 3. Loading the tower from text_encoder/
# ---------------------------------------------------------------------------------------------

def config_from_json(raw: dict, folder="<config>") -> VisionConfig:
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise ckpt.CheckpointError(f"{folder}/config.json has no vision_config: it is not a Qwen2.5-VL text encoder")
    vision = dict(vision)
    if "in_chans" in vision:                             # the official (transformers 4.x) spelling
        vision.setdefault("in_channels", vision.pop("in_chans"))
    theta = (vision.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        vision["rope_theta"] = theta
    if vision.get("hidden_act", "silu") != "silu":
        raise ckpt.CheckpointError(f"{folder}/config.json: vision hidden_act {vision['hidden_act']!r}; "
                                   "Qwen2.5-VL's tower uses silu")
    required = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "fullatt_block_indexes")
    return ckpt.config_from_json(VisionConfig, vision, folder, required)


def checkpoint_name_to_ours(name: str) -> str | None:
    """visual.blocks.0.attn.qkv.weight (legacy) or model.visual.blocks.0... (5.x) -> blocks.0.attn.qkv.weight."""
    for prefix in ("model.visual.", "visual."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None                                          # the language model: not part of the tower


def load(path, device=None, dtype=None) -> VisionTower:
    """Load the vision tower from an official `text_encoder/` folder."""
    config = config_from_json(ckpt.read_config(path), path)
    model = ckpt.build_on_meta(lambda: VisionTower(config))
    return ckpt.load_weights(model, path, "model", device=device, dtype=dtype, rename=checkpoint_name_to_ours)

"""Qwen-Image's VAE: the Wan-2.1 causal 3-D convolutional autoencoder, in one file.

An image (or video) in [-1, 1] becomes a latent with 16 channels at 1/8 of the resolution:

    x (B, 3, T, H, W) -> encoder -> quant_conv -> (mean, logvar) (B, 16, T', H/8, W/8)
    z                 -> post_quant_conv -> decoder -> x' (B, 3, T, H, W), clamped to [-1, 1]

with T = 1 + 4k frames and T' = 1 + k: the first frame is coded on its own (so an image is a
one-frame video), later frames four at a time. Every convolution is *causal in time*: a 3x3x3
kernel pads two frames of zeros on the past side only, so frame t never sees frame t+1, and a
video can be coded chunk by chunk with each conv remembering the last two frames it saw
(the "cache" below).

**The single-image shortcut.** For one frame the two padded past frames are zeros, so a causal
3x3x3 conv is exactly a 2-D 3x3 conv with the kernel's *last* time slice, and the temporal
down/upsampling convs (`time_conv`) are never applied to the first frame. An image therefore runs
through a plain 2-D network: about 1/3 of the convolution work of the general path. The general
streaming path is kept for videos and as the reference the fast path is tested against.

Parameter names equal diffusers' `AutoencoderKLQwenImage`, so the official `vae/` folder loads
strictly (194 tensors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import weights

LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclass
class VAEConfig:
    """Defaults are the official Qwen-Image vae/config.json."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic) the checkpoint's spelling
    input_channels: int = 3
    latents_mean: tuple[float, ...] = field(default=LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=LATENTS_STD)

    def __post_init__(self):
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            setattr(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_downsample needs one entry per downsampling stage (len(dim_mult) - 1)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} values")
        # Each latent channel is divided by its std (normalize_latents): a 0 gives Inf, a negative one
        # flips the channel, and both pass unnoticed into a ruined picture.
        bad = [(i, s) for i, s in enumerate(self.latents_std) if not (math.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(
                f"latents_std[{bad[0][0]}]={bad[0][1]!r}: every latents_std value must be a finite number > 0 "
                "(the latents are divided by it); restore the value from the official vae/config.json"
            )

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side: 2 per downsampling stage (8 for the official VAE)."""
        return 2 ** (len(self.dim_mult) - 1)

    def to_json(self) -> dict:
        """vae/config.json, as diffusers writes it."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {
            "_class_name": "AutoencoderKLQwenImage",
            "_diffusers_version": "0.42.1",
            "attn_scales": [],
            "dropout": 0.0,
            **fields,
        }


# ---------------------------------------------------------------------------------------------
# Building blocks. Every forward accepts (B, C, H, W) images (the fast path) or (B, C, T, H, W)
# videos with a `cache` dict (the streaming path).
# ---------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """A 3-D conv that pads time on the past side only (2 * p frames), space symmetrically.

    Streaming: `cache[self]` holds the last two input frames of the previous chunk; they replace
    that many zero frames of padding, so chunk-by-chunk output equals one pass over the video."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.time_pad, self.space_pad = 2 * p[0], (p[1], p[2])

    def forward(self, x, cache=None):
        if x.ndim == 4:  # one frame: past frames are zeros, only the last kernel slice ever sees data
            return F.conv2d(x, self.weight[:, :, -1], self.bias, self.stride[1:], self.space_pad)
        time_pad = self.time_pad
        if cache is not None and time_pad > 0:
            past = cache.get(self)  # (B, C, <=2, H, W) or None
            cache[self] = (x if past is None else torch.cat([past, x], dim=2))[:, :, -2:]
            if past is not None:
                x = torch.cat([past, x], dim=2)
                time_pad -= past.shape[2]
        ph, pw = self.space_pad
        x = F.pad(x, (pw, pw, ph, ph, time_pad, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Normalise each pixel's channel vector to unit RMS, then scale by `gamma` (computed in fp32)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        # The checkpoint stores gamma as (C, 1, 1) in attention blocks and (C, 1, 1, 1) elsewhere.
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        gamma = self.gamma.reshape(-1, *[1] * (x.ndim - 2))  # (C, 1, 1[, 1]) to match x
        normalized = F.normalize(x.float(), dim=1).to(x.dtype)  # x / |x| over channels
        return normalized * self.scale * gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache=None):
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.conv_shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (used once, in the middle)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        if x.ndim == 5:  # frames are independent: fold time into the batch
            B, C, T, H, W = x.shape
            y = self(x.transpose(1, 2).reshape(B * T, C, H, W))
            return y.reshape(B, T, C, H, W).transpose(1, 2)
        B, C, H, W = x.shape
        qkv = self.to_qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.reshape(B, 1, 3 * C, H * W).transpose(2, 3).contiguous()  # (B, 1, HW, 3C): pixels attend
        q, k, v = qkv.chunk(3, dim=-1)  # (B, 1, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(out)


class Resample(nn.Module):
    """2x spatial down/upsampling per frame, plus (modes *3d) 2x temporal, applied after the first frame.

    downsample: pad right/bottom by one, 3x3 conv with stride 2. upsample: nearest-exact 2x, 3x3
    conv halving the channels. The temporal convs (`time_conv`) only act on frames after the first:
    downsample3d turns each 4 frames into 2 (stride 2 over [last frame before, 4 new]); upsample3d
    makes every frame two by predicting 2C channels and interleaving them."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def spatial(self, x):
        if self.mode.startswith("upsample"):  # upsample in fp32, like the reference
            return self.resample[1](self.resample[0](x.float()).to(x.dtype))
        return self.resample(x)

    def forward(self, x, cache=None):
        if x.ndim == 4:  # one frame: spatial only
            return self.spatial(x)
        if self.mode == "upsample3d" and cache is not None:
            if self not in cache:
                cache[self] = True  # the first frame is not upsampled in time
            else:
                B, C, T, H, W = x.shape
                x = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                x = x.reshape(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)
        B, C, T, H, W = x.shape
        x = self.spatial(x.transpose(1, 2).reshape(B * T, C, H, W))  # frames through the 2-D part
        x = x.reshape(B, T, *x.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d" and cache is not None:
            previous = cache.get(self)
            cache[self] = x[:, :, -1:]
            if previous is not None:  # after the first chunk: halve time
                x = self.time_conv(torch.cat([previous, x], dim=2))
        return x


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache=None):
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1,) + c.dim_mult]  # 96, 96, 192, 384, 384
        self.conv_in = CausalConv3d(c.input_channels, dims[0], 3, padding=1)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(c.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(c.dim_mult) - 1:
                blocks.append(
                    Resample(out_dim, "downsample3d" if c.temperal_downsample[i] else "downsample2d")
                )
        self.down_blocks = nn.ModuleList(blocks)  # a flat list, as in the checkpoint
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1)  # mean and logvar

    def forward(self, x, cache=None):
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x, cache=None):
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (c.dim_mult[-1],) + c.dim_mult[::-1]]  # 384, 384, 384, 192, 96
        temporal_upsample = c.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if i > 0 else in_dim  # the upsampler before it halved the channels
            mode = None
            if i < len(c.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, c.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], c.input_channels, 3, padding=1)

    def forward(self, x, cache=None):
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class QwenImageVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    # --- the two directions, whole images/videos -------------------------------------------

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 32, H/8, W/8), or (B, 3, 1 + 4k, H, W) -> (B, 32, 1 + k, H/8, W/8): the
        posterior's mean and logvar stacked. A 4-D input takes the 2-D path, a 5-D one the causal 3-D
        path with its streaming cache (the same numbers for one frame); no checks, no tiling."""
        if x.ndim == 4:
            return self.quant_conv(self.encoder(x))
        cache = {}  # streaming: first frame, then 4 at a time
        chunks = [x[:, :, :1]] + (list(x[:, :, 1:].split(4, dim=2)) if x.shape[2] > 1 else [])
        return self.quant_conv(torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2))

    def decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 16, h, w) -> (B, 3, 8h, 8w), or (B, 16, 1 + k, h, w) -> (B, 3, 1 + 4k, 8h, 8w); not clamped."""
        z = self.post_quant_conv(z)
        if z.ndim == 4:
            return self.decoder(z)
        cache = {}  # streaming: one latent frame at a time
        return torch.cat([self.decoder(frame, cache) for frame in z.split(1, dim=2)], dim=2)

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, tiled: bool = False, tile_size: int = 256, tile_stride: int = 192
    ) -> DiagonalGaussian:
        """x in [-1, 1]: (B, 3, H, W) or (B, 3, T, H, W) with T = 1 + 4k; H, W multiples of 8.

        Latents keep the input's rank: (B, 16, H/8, W/8) or (B, 16, 1 + k, H/8, W/8), unnormalised.
        A single frame, 4-D or 5-D, takes the 2-D fast path."""
        self._check_input(x, "x", self.config.input_channels, pixels=True)
        return DiagonalGaussian(
            self._whole_or_tiled(x, self.encode_moments, tiled, tile_size, tile_stride, decoding=False)
        )

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, tiled: bool = False, tile_size: int = 256, tile_stride: int = 192
    ) -> torch.Tensor:
        """Unnormalised latents (B, 16, h, w) or (B, 16, 1 + k, h, w) -> images in [-1, 1].

        Tiling: latent tiles of tile_size/8 every tile_stride/8, decoded one by one, overlaps blended
        linearly. diffusers clamps only its untiled output; ours is clamped on both paths."""
        self._check_input(z, "z", self.config.z_dim, pixels=False)
        return self._whole_or_tiled(
            z, self.decode_unclamped, tiled, tile_size, tile_stride, decoding=True
        ).clamp(-1, 1)

    def _whole_or_tiled(self, x, fn, tiled, tile_size, tile_stride, decoding: bool):
        """fn(x) at once or tile by tile; a one-frame video takes the 2-D path and keeps its frame axis."""
        s = self.config.scale_factor
        one_frame_5d = x.ndim == 5 and x.shape[2] == 1
        x = (x[:, :, 0] if one_frame_5d else x).to(self.quant_conv.weight.dtype)
        if not tiled:
            out = fn(x)
        else:
            _check_tiles(tile_size, tile_stride, s)
            unit = s if decoding else 1  # tile sizes are in pixels; the decoder's input is in latents
            out = _tiled(x, fn, tile_size // unit, tile_stride // unit, out_scale=s if decoding else 1 / s)
        return out[:, :, None] if one_frame_5d else out

    # --- latent normalisation: what the MMDiT sees ----------------------------------------------

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std per channel: the scale the MMDiT was trained on."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    def _stats(self, z):
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(self.config.latents_std, device=z.device, dtype=z.dtype).view(shape)
        return mean, std

    def _check_input(self, x, name, channels, pixels):
        kind = "images in [-1, 1]" if pixels else "latents"
        if not torch.is_tensor(x) or x.ndim not in (4, 5):
            raise ValueError(
                f"{name} must be a 4-D (B, C, H, W) or 5-D (B, C, T, H, W) tensor of {kind}, "
                f"got {getattr(x, 'shape', type(x).__name__)}"
            )
        if x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels in dim 1, got shape {tuple(x.shape)}")
        s = self.config.scale_factor
        if pixels and (x.shape[-1] % s or x.shape[-2] % s):
            raise ValueError(
                f"{name}: height and width must be multiples of {s}, got {x.shape[-2]}x{x.shape[-1]}; "
                "resize or crop the image"
            )
        if x.ndim == 5 and pixels and (x.shape[2] - 1) % 4:
            raise ValueError(f"{name}: a video must have 1 + 4k frames, got {x.shape[2]}")


def blend_tiles(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` rows/cols of `cur` with the last ones of `prev` (weights y/extent).

    prev is the tile above (dim=-2) or to the left (dim=-1); extent is capped at both tiles' size along dim.
    Public: lesson 04's assignment (assignments/tile_blend.py) is to write this function."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent <= 0:
        return cur
    w = torch.arange(extent, device=cur.device, dtype=torch.float64) / extent
    w = w.view(-1, 1) if dim == -2 else w.view(1, -1)
    head = cur.narrow(dim, 0, extent)
    tail = prev.narrow(dim, prev.shape[dim] - extent, extent)
    mixed = tail * (1 - w).to(cur.dtype) + head * w.to(cur.dtype)
    return torch.cat([mixed, cur.narrow(dim, extent, cur.shape[dim] - extent)], dim=dim)


def _tiled(x, fn, tile, stride, out_scale, blend=blend_tiles):
    """Run `fn` on overlapping tiles of x's last two dims and blend the overlaps linearly.

    Tiles of `tile` start every `stride` (input units). Each output tile is `out_scale` times the
    size; the overlapping band (tile - stride, output units) of each tile is cross-faded with its
    top and left neighbours, then every tile is cut to its stride and the mosaic cropped. The
    arithmetic follows diffusers' tiled_encode/tiled_decode, so the results match them.

    blend: the cross-fade, blend(prev, cur, extent, dim) -> the blended cur. An argument so that lesson 04's
    grader can run a tiled decode with the student's own cross-fade."""
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:  # fits in one tile: no tiling, as in the reference
        return fn(x)
    out_tile = round(tile * out_scale)
    out_stride = round(stride * out_scale)
    overlap = out_tile - out_stride
    rows = [
        [fn(x[..., i : i + tile, j : j + tile]) for j in range(0, W, stride)] for i in range(0, H, stride)
    ]
    out_rows = []
    for r, row in enumerate(rows):
        pieces = []
        for c, t in enumerate(row):
            if r > 0:
                t = blend(rows[r - 1][c], t, overlap, dim=-2)
            if c > 0:
                t = blend(row[c - 1], t, overlap, dim=-1)
            row[c] = t  # the blended tile is what the next one blends with
            pieces.append(t[..., :out_stride, :out_stride])
        out_rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(out_rows, dim=-2)[..., : round(H * out_scale), : round(W * out_scale)]


def _check_tiles(tile_size: int, tile_stride: int, scale: int):
    if not isinstance(tile_size, int) or not isinstance(tile_stride, int):
        raise ValueError(
            f"tile_size and tile_stride must be ints (pixels), got {tile_size!r}, {tile_stride!r}"
        )
    if tile_size < scale or tile_size % scale or tile_stride < scale or tile_stride % scale:
        raise ValueError(
            f"tile_size ({tile_size}) and tile_stride ({tile_stride}) must be positive multiples "
            f"of {scale} pixels (one latent pixel)"
        )
    if tile_stride > tile_size:
        raise ValueError(
            f"tile_stride ({tile_stride}) must not exceed tile_size ({tile_size}): tiles would leave gaps"
        )


# ---------------------------------------------------------------------------------------------
# Loading the official vae/ folder
# ---------------------------------------------------------------------------------------------

REQUIRED_FIELDS = (
    "base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "temperal_downsample",
    "latents_mean",
    "latents_std",
)
WEIGHTS_STEM = "diffusion_pytorch_model"


def config_from_json(raw: dict, folder="<config>") -> VAEConfig:
    if raw.get("attn_scales"):
        raise weights.CheckpointError(
            f"{folder}/config.json: attn_scales={raw['attn_scales']} (attention in the "
            "down blocks) is not used by Qwen-Image and not supported"
        )
    return weights.config_from_json(VAEConfig, raw, folder, REQUIRED_FIELDS)


def load(path, device=None, dtype=None, check_finite: bool = True) -> QwenImageVAE:
    """Load an official `vae/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    config = config_from_json(weights.read_config(path), path)
    counts = {
        "decoder.up_blocks": ("len(dim_mult)", len(config.dim_mult)),
        "decoder.up_blocks.0.resnets": ("num_res_blocks + 1", config.num_res_blocks + 1),
    }
    return weights.load_weights(
        lambda: QwenImageVAE(config),
        path,
        WEIGHTS_STEM,
        device=device,
        dtype=dtype,
        block_counts=counts,
        check_finite=check_finite,
    )

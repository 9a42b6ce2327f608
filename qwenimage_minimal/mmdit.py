"""The Qwen-Image MMDiT: a 20B-parameter multimodal diffusion transformer, in one file.

It predicts the flow-matching velocity v = noise - x0 for packed image latents, conditioned on
the Qwen2.5-VL prompt embedding and on the noise level sigma:

    img (B, N, 64)    packed latents: each token is a 2x2 patch of the 16-channel latent
    txt (B, L, 3584)  Qwen2.5-VL last hidden state
    sigma (B,)        noise level in [0, 1]

    txt -> RMSNorm -> Linear(3584 -> 3072)        img -> Linear(64 -> 3072)
    sigma -> sinusoid(256) -> MLP -> temb (B, 3072)
    60 x dual-stream block: each stream has its own weights (AdaLN, QKV, MLP) but the two
         streams attend jointly over the concatenated sequence [text, image]
    img -> AdaLN(temb) -> Linear(3072 -> 64) = v (B, N, 64)

Positions enter only through a 3-axis rotary embedding (frame, row, column), written below with
explicit complex numbers. Parameter names equal diffusers' (`QwenImageTransformer2DModel`), so
the official `transformer/` folder loads with a strict key check and no renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import weights


@dataclass
class MMDiTConfig:
    """Defaults are the official Qwen-Image transformer (transformer/config.json)."""

    patch_size: int = 2
    in_channels: int = 64  # 16 latent channels x 2 x 2 patch
    out_channels: int = 16  # per latent pixel; proj_out emits patch_size**2 * out_channels
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # head dims given to (frame, row, column)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    zero_cond_t: bool = False  # Edit-2511: reference-image tokens are modulated with t = 0

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                f"attention_head_dim={self.attention_head_dim}"
            )

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent this model denoises: each token is a patch_size² patch of them."""
        return self.in_channels // self.patch_size**2

    def to_json(self) -> dict:
        """transformer/config.json, as diffusers writes it (rope_theta and eps are fixed there)."""
        fields = asdict(self)
        fields.pop("rope_theta"), fields.pop("eps")
        fields["axes_dims_rope"] = list(fields["axes_dims_rope"])
        return {
            "_class_name": "QwenImageTransformer2DModel",
            "_diffusers_version": "0.42.1",
            "guidance_embeds": False,
            **fields,
        }


# ---------------------------------------------------------------------------------------------
# Packing: latent pixels -> tokens
# ---------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C * 4) tokens, row-major over 2x2 patches.

    Within a token the channels run slowest: [c0 at (0,0), (0,1), (1,0), (1,1), c1 at ...]."""
    B, C, H, W = latents.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(
            f"latent height and width must be multiples of {p}, got {H}x{W} "
            f"(image sizes must be multiples of {8 * p} pixels)"
        )
    x = latents.reshape(B, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """(B, N, C * 4) tokens -> (B, C, height, width) latents; height/width in latent pixels."""
    B, N, D = tokens.shape
    p = patch_size
    if N != (height // p) * (width // p):
        raise ValueError(f"{N} tokens cannot be unpacked to a {height}x{width} latent")
    x = tokens.reshape(B, height // p, width // p, D // (p * p), p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, D // (p * p), height, width)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding, as complex numbers
# ---------------------------------------------------------------------------------------------
# Every token gets a position (frame, row, column). Each attention head's 128 channels are read
# as 64 complex numbers; the first 8 rotate with the frame index, the next 28 with the row, the
# last 28 with the column. Rotating q and k by e^{i * pos * freq} makes their dot product depend
# only on the position *difference*. The DiT pairs neighbouring channels (x[2i], x[2i+1]) into one
# complex number ("interleaved"); Qwen2.5-VL pairs channel i with i + D/2 ("rotate half"). Same
# idea, different memory layout: a checkpoint only works with the layout it was trained with.


def image_positions(frames: int, height: int, width: int, frame_index: int) -> torch.Tensor:
    """(frames*height*width, 3) positions of one image's tokens, row-major.

    Rows and columns are *centred*: a grid of h rows gets rows -(h - h//2) .. h//2 - 1, so the
    image centre sits near 0 whatever the resolution (an odd h is one row longer above centre).
    The frame axis holds `frame_index`, the image's place in the sequence (0 = the latent being
    denoised, 1, 2, ... = reference images in Edit)."""
    f = torch.arange(frame_index, frame_index + frames, dtype=torch.float32)
    r = torch.arange(-(height - height // 2), height // 2, dtype=torch.float32)
    c = torch.arange(-(width - width // 2), width // 2, dtype=torch.float32)
    grid = torch.meshgrid(f, r, c, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def text_positions(length: int, start: int) -> torch.Tensor:
    """(length, 3) text positions: start, start+1, ... on all three axes (text is 1-D)."""
    p = torch.arange(start, start + length, dtype=torch.float32)
    return p[:, None].expand(length, 3)


def rope_table(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """(S, 3) positions -> (S, head_dim/2) complex rotations e^{i * pos_axis * freq_k}."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
        angles.append(positions[:, axis, None] * inv_freq)  # (S, dim/2)
    angles = torch.cat(angles, dim=-1)  # (S, head_dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def rope_tables(img_shapes, text_len: int, config: MMDiTConfig, device=None, table=rope_table):
    """RoPE rotations for the image tokens (all images, in sequence order) and the text tokens, each
    built by `table` (rope_table unless MMDiT.use_rope chose another).

    Text positions start just after the largest image's half-extent, max(h//2, w//2), so no text
    token shares a position with an image token (image positions are centred around 0)."""
    img_pos = torch.cat([image_positions(f, h, w, i) for i, (f, h, w) in enumerate(img_shapes)])
    text_start = max(max(h // 2, w // 2) for _, h, w in img_shapes)
    txt_pos = text_positions(text_len, text_start)
    rotations = lambda p: table(p, config.axes_dims_rope, config.rope_theta).to(device)
    return rotations(img_pos), rotations(txt_pos)


def cached_rope_tables(cache: dict, img_shapes, text_len: int, config: MMDiTConfig, device, table=rope_table):
    """rope_tables, kept in `cache` (a model's own dict) by (img_shapes, text_len, device, table): the tables are
    the same at every step, so they are built on the CPU and copied over once, not at every step."""
    key = (tuple(img_shapes), text_len, device, table)
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = rope_tables(img_shapes, text_len, config, device=device, table=table)
    return cache[key]


def joint_key_mask(txt_mask, n_image: int):
    """(B, L) text mask (1 = token) -> (B, L + n_image) bool keys over [text | image], or None without padding."""
    if txt_mask is None:
        return None
    B = txt_mask.shape[0]
    image = torch.ones(B, n_image, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([txt_mask.to(torch.bool), image], dim=1)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, D) queries/keys by (S, D/2) complex rotations, interleaved pairs, in fp32."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, S, H, D/2)
    rotated = x_complex * rotations[:, None, :]  # broadcast over heads
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, S, H, D)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in fp32; the result is cast to the weight's dtype before
    the multiply. (Qwen2.5-VL's RMSNorm in text_encoder.py casts to the *input's* dtype instead:
    each follows its own reference, so bf16 runs match them bit for bit.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(self.weight.dtype) * self.weight


def timestep_sinusoid(sigma: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """(B,) sigma -> (B, dim) [cos | sin] features of the timestep t = 1000 * sigma.

    Frequencies run from 1 to 1/10000 geometrically; the angles are computed in fp32 even when
    sigma arrives in bf16 (already rounded: bf16(0.7) = 0.69921875, as in the reference)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    )
    angles = scale * (sigma[:, None].float() * freqs[None, :])  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear -> temb (B, dim)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEmbedding(nn.Module):
    """sigma -> temb. (The extra `timestep_embedder` level only mirrors the checkpoint's names.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(256, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_sinusoid(sigma).to(dtype))


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> 4*dim -> tanh-GELU -> dim. Indexed `net.0.proj` / `net.2` like the checkpoint (net.1 was dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class JointAttention(nn.Module):
    """One attention over the concatenated [text, image] sequence, with separate projections per stream.

    `to_q/to_k/to_v/to_out` act on image tokens, `add_*_proj/to_add_out` on text tokens; each
    stream normalises its per-head q and k with its own RMSNorm before the rotary embedding."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            nn.Linear(dim, heads * head_dim) for _ in range(3)
        )
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim))  # the checkpoint names it `to_out.0`
        self.to_add_out = nn.Linear(heads * head_dim, dim)
        self.apply_rope = apply_rope  # the rotation q and k get; MMDiT.use_rope may swap in another

    def forward(self, img, txt, img_rope, txt_rope, key_mask=None):
        # img (B, N, dim), txt (B, L, dim); key_mask (B, L + N) bool or None
        # (B, S, H, Dh); -1, not self.heads: under tensor parallel (parallel.py) a process holds H / n heads
        split = lambda t: t.unflatten(-1, (-1, self.head_dim))
        img_q = self.apply_rope(self.norm_q(split(self.to_q(img))), img_rope)
        img_k = self.apply_rope(self.norm_k(split(self.to_k(img))), img_rope)
        txt_q = self.apply_rope(self.norm_added_q(split(self.add_q_proj(txt))), txt_rope)
        txt_k = self.apply_rope(self.norm_added_k(split(self.add_k_proj(txt))), txt_rope)
        img_v, txt_v = split(self.to_v(img)), split(self.add_v_proj(txt))

        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)  # (B, H, L + N, Dh)
        k = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        v = torch.cat([txt_v, img_v], dim=1).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # padded text keys are ignored
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L + N, Dh)
        out = out.transpose(1, 2).flatten(2)  # (B, L + N, H * Dh)

        # Split back into the streams. contiguous(): a strided input sends a bf16 Linear down another
        # CPU matmul path whose rounding differs from the reference's; this keeps bf16 runs identical.
        L = txt.shape[1]
        return self.to_out(out[:, L:].contiguous()), self.to_add_out(out[:, :L].contiguous())


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DualStreamBlock(nn.Module):
    """Per stream: x += gate1 * Attn(AdaLN1(x)); x += gate2 * MLP(AdaLN2(x)), attention joint.

    AdaLN: LayerNorm without weights, then scale and shift predicted from temb. Each stream's
    `*_mod` Linear emits six vectors: (shift, scale, gate) for the attention half, then for the MLP."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        dim = config.dim
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.eps)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.eps)
        self.attn = JointAttention(dim, config.num_attention_heads, config.attention_head_dim, config.eps)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(self, img, txt, temb, img_rope, txt_rope, key_mask=None, temb_ref=None, n_noise=None):
        # img (B, N, dim), txt (B, L, dim), temb (B, dim)
        img_mod = self.img_mod(temb)[:, None]  # (B, 1, 6*dim), same for every token
        if temb_ref is not None:  # zero_cond_t: reference tokens get t = 0
            ref_mod = self.img_mod(temb_ref)[:, None]
            n_ref = img.shape[1] - n_noise
            img_mod = torch.cat([img_mod.expand(-1, n_noise, -1), ref_mod.expand(-1, n_ref, -1)], dim=1)
        txt_mod = self.txt_mod(temb)[:, None]  # (B, 1, 6*dim)
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod.chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod.chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            modulate(self.img_norm1(img), img_shift1, img_scale1),
            modulate(self.txt_norm1(txt), txt_shift1, txt_scale1),
            img_rope,
            txt_rope,
            key_mask,
        )
        img = img + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn

        img = img + img_gate2 * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, txt


class OutputNorm(nn.Module):
    """Final AdaLN. Note the order: this Linear emits (scale, shift), the blocks' emit (shift, scale, gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)  # (B, dim) each
        return modulate(self.norm(x), shift[:, None], scale[:, None])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.time_text_embed = TimestepEmbedding(dim)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=config.eps)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(config) for _ in range(config.num_layers))
        self.norm_out = OutputNorm(dim, config.eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory
        self._rope_cache = {}  # (img_shapes, text_len, device) -> RoPE tables: same every step
        self.rope_table = rope_table  # builds those tables; use_rope may swap in another
        self.streamer = None  # a streaming.WeightStreamer when the blocks do not all fit the GPU

    def use_rope(self, table=None, apply=None) -> None:
        """Rotate with other RoPE functions than this file's (the course's capstone, assignments/capstone.py,
        swaps in a student's and draws with them):

            table   table(positions (S, 3), axes_dims, theta) -> (S, head_dim/2) complex rotations, as
                    rope_table: what the model builds its tables with (the tables built so far are dropped)
            apply   apply(x (B, S, H, head_dim), rotations) -> x rotated, as apply_rope: what every
                    JointAttention rotates its queries and keys with, the blocks a WeightStreamer has
                    copied into its slots included
        None is this file's function, so use_rope() undoes a swap. Not reached: a ControlNet's own blocks
        and tables (controlnet.py builds them with this file's functions whatever the MMDiT uses)."""
        for name, fn in (("table", table), ("apply", apply)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a function or None, got {type(fn).__name__}")
        self.rope_table = rope_table if table is None else table
        self._rope_cache.clear()
        slots = [] if self.streamer is None else self.streamer.slots
        for module in [*self.modules(), *(m for slot in slots for m in slot.modules())]:
            if isinstance(module, JointAttention):
                module.apply_rope = apply_rope if apply is None else apply

    def forward(self, img, txt, txt_mask, sigma, img_shapes, controlnet_block_samples=None):
        """
        img         (B, N, in_channels) packed latents; N = sum of f*h*w over `img_shapes`
        txt         (B, L, joint_attention_dim) prompt embeddings
        txt_mask    (B, L) 1 = real token, 0 = padding; or None (no padding anywhere)
        sigma       (B,) or scalar: the noise level in [0, 1] (diffusers calls it `timestep`: the
                    scheduler's timestep / 1000)
        img_shapes  list of (frames, h, w) in packed-token units, one per image in the sequence
                    (the latent being denoised first, then any reference images), shared by the batch
        controlnet_block_samples  None, or a list of K residuals (B, N, dim) from ControlNets
                    (controlnet.py), added to the image stream after the blocks: block j gets residual
                    j // ceil(num_layers / K), so 5 residuals serve 60 blocks, 12 blocks each (as diffusers)
        returns     (B, N, patch_size**2 * out_channels) velocity
        """
        img_shapes = [tuple(int(v) for v in s) for s in img_shapes]
        self._check_inputs(img, txt, txt_mask, img_shapes)
        B, N, _ = img.shape
        L = txt.shape[1]
        dtype = self.img_in.weight.dtype
        sigma = torch.as_tensor(sigma, device=img.device).reshape(-1).expand(B)

        img = self.img_in(img.to(dtype))  # (B, N, dim)
        txt = self.txt_in(self.txt_norm(txt.to(dtype)))  # (B, L, dim)
        temb = self.time_text_embed(sigma.to(dtype), dtype)  # (B, dim)
        temb_ref, n_noise = None, None
        if self.config.zero_cond_t:
            temb_ref = self.time_text_embed(torch.zeros_like(sigma, dtype=dtype), dtype)
            n_noise = math.prod(img_shapes[0])

        img_rope, txt_rope = cached_rope_tables(
            self._rope_cache, img_shapes, L, self.config, img.device, table=self.rope_table
        )  # (N, Dh/2), (L, Dh/2) complex
        key_mask = joint_key_mask(None if txt_mask is None else txt_mask.to(img.device), N)  # (B, L + N)
        every = 0  # blocks per ControlNet residual
        if controlnet_block_samples is not None:
            every = -(-self.config.num_layers // len(controlnet_block_samples))  # ceil

        # The one place streaming (streaming.py) hooks in: a WeightStreamer sets `self.streamer`, and its
        # blocks() yields each block once its weights are on the device (a streamed one as a slot that was
        # filled while the previous block computed). Why an attribute read here and not a wrapper or hooks:
        # the loop must hand out *other modules* (the slots) in the blocks' place, which forward hooks cannot,
        # and a wrapper model would duplicate this forward. Without a streamer it is the plain block list.
        blocks = self.transformer_blocks if self.streamer is None else self.streamer.blocks()
        for index, block in enumerate(blocks):
            args = (img, txt, temb, img_rope, txt_rope, key_mask, temb_ref, n_noise)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, txt = checkpoint(block, *args, use_reentrant=False)
            else:
                img, txt = block(*args)
            if every:  # a ControlNet's guidance: one residual per group of blocks
                img = img + controlnet_block_samples[index // every]

        return self.proj_out(self.norm_out(img, temb))  # (B, N, 64)

    def _check_inputs(self, img, txt, txt_mask, img_shapes):
        c = self.config
        if img.ndim != 3 or img.shape[-1] != c.in_channels:
            raise ValueError(
                f"img must be (batch, tokens, {c.in_channels}) packed latents, got {tuple(img.shape)}"
            )
        if txt.ndim != 3 or txt.shape[-1] != c.joint_attention_dim or txt.shape[0] != img.shape[0]:
            raise ValueError(
                f"txt must be (batch={img.shape[0]}, text_len, {c.joint_attention_dim}), "
                f"got {tuple(txt.shape)}"
            )
        if txt_mask is not None and tuple(txt_mask.shape) != tuple(txt.shape[:2]):
            raise ValueError(
                f"txt_mask must be (batch, text_len) = {tuple(txt.shape[:2])}, got {tuple(txt_mask.shape)}"
            )
        if not img_shapes or any(len(s) != 3 or min(s) < 1 for s in img_shapes):
            raise ValueError(
                f"img_shapes must be a non-empty list of (frames, h, w) with positive sizes, got {img_shapes}"
            )
        n = sum(math.prod(s) for s in img_shapes)
        if n != img.shape[1]:
            raise ValueError(
                f"img_shapes {img_shapes} describe {n} tokens but img has {img.shape[1]}; "
                "give one (frames, h, w) per image in packed-token units (latent size / 2)"
            )


def compile_blocks(model: MMDiT, **options) -> MMDiT:
    """Regional compilation: torch.compile each block rather than the whole model. The blocks share one
    compiled graph (their weights are its inputs), so compiling takes seconds, not minutes, and forward
    stays the readable eager reference. options: torch.compile's (mode, backend, dynamic, ...)."""
    for block in model.transformer_blocks:
        block.compile(fullgraph=True, **options)
    if model.streamer is not None:
        model.streamer.compile_options = options
    return model


# ---------------------------------------------------------------------------------------------
# Loading the official transformer/ folder
# ---------------------------------------------------------------------------------------------

REQUIRED_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "axes_dims_rope",
)
UNSUPPORTED_FLAGS = ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")
WEIGHTS_STEM = "diffusion_pytorch_model"


def config_from_folder(path) -> MMDiTConfig:
    raw = weights.read_config(path)
    return weights.config_from_json(MMDiTConfig, raw, path, REQUIRED_FIELDS, must_be_false=UNSUPPORTED_FLAGS)


def load(path, device=None, dtype=None, check_finite: bool = True) -> MMDiT:
    """Load an official `transformer/` folder (config.json + sharded or single safetensors). This file
    knows nothing of fp8: a folder stored in fp8 loads with fp8.load_transformer, and
    pipeline.load_transformer chooses between the two by reading the folder's headers."""
    config = config_from_folder(path)
    return weights.load_weights(
        lambda: MMDiT(config),
        path,
        WEIGHTS_STEM,
        device=device,
        dtype=dtype,
        block_counts={"transformer_blocks": ("num_layers", config.num_layers)},
        check_finite=check_finite,
    )

"""The text path of Qwen2.5-VL-7B, the language model Qwen-Image conditions on, in one file.

Qwen-Image runs the 28-layer decoder once over the templated prompt and takes the *last hidden
state* (after the final RMSNorm) as the conditioning sequence for the MMDiT; the templates and the
prompt -> embeddings step are in prompts.py.

The decoder is a standard pre-norm transformer: embeddings, 28 x [RMSNorm -> grouped-query
attention (28 query heads share 4 key/value heads; q/k/v have biases) -> residual; RMSNorm ->
SwiGLU MLP -> residual], final RMSNorm. Positions use *multimodal* RoPE: each token has three
position ids (time, height, width). For text all three are equal, which makes it ordinary RoPE.
The lm_head that would predict the next token is never loaded.

Edit prompts also hold images: the vision tower's features (vision.py) fill the `<|image_pad|>`
slots and get 3-D positions, (frame, row, column) of their merged patch group, offset to start after
the text before them; the text after an image continues from offset + max(rows, cols). That is how
Qwen2.5-VL was trained, and what transformers computes when it is given `mm_token_type_ids` (see
`multimodal_position_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import weights


@dataclass
class TextEncoderConfig:
    """Defaults are Qwen2.5-VL-7B's language model (text_encoder/config.json)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # frequency pairs per (time, height, width)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        self.mrope_section = tuple(self.mrope_section)
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def to_json(self, vision_config: dict | None = None) -> dict:
        """text_encoder/config.json in the official (transformers 4.x) form: the language model's
        fields at the top, the M-RoPE sections under rope_scaling, the tower's under vision_config."""
        config = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": 128000,
            "rope_scaling": {
                "mrope_section": list(self.mrope_section),
                "rope_type": "default",
                "type": "default",
            },
            "tie_word_embeddings": False,
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "vision_token_id": 151654,
        }
        if vision_config is not None:
            config["vision_config"] = vision_config
        return config


# ---------------------------------------------------------------------------------------------
# Multimodal rotary embedding, "rotate half" layout
# ---------------------------------------------------------------------------------------------
# Unlike the MMDiT (which pairs neighbouring channels x[2i], x[2i+1] as complex numbers),
# Qwen2.5-VL pairs channel i with channel i + head_dim/2: x is rotated as
# x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a]. The head_dim/2 = 64
# frequencies are dealt out to the three position axes: the first 16 rotate with the time id, the
# next 24 with the height id, the last 24 with the width id.


def mrope_cos_sin(position_ids: torch.Tensor, config: TextEncoderConfig, dtype: torch.dtype):
    """(3, B, S) position ids -> cos, sin of shape (B, S, head_dim), computed in fp32, cast to dtype."""
    d = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=position_ids.device) / d)
    )
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, S, d/2)
    chunks = freqs.split(list(config.mrope_section), dim=-1)
    freqs = torch.cat([chunk[axis] for axis, chunk in enumerate(chunks)], dim=-1)  # (B, S, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) mask -> (3, B, S) ids: 0, 1, 2, ... over the real tokens, the same on all three axes."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[None].expand(3, -1, -1)


def multimodal_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw,
    image_token_id: int,
    merge_size: int = 2,
) -> torch.Tensor:
    """(B, S) ids and mask with runs of image tokens -> (3, B, S) position ids (as Qwen2.5-VL was trained).

    Text tokens count up 0, 1, 2, ... on all three axes. An image of (t, h, w) patches takes
    t * (h/2) * (w/2) tokens; the one for merged group (f, r, c) gets (start + f, start + r,
    start + c), where start is the position the next text token would have had. Text after the
    image resumes at start + max(h/2, w/2). `image_grid_thw` lists the images in the order they
    appear, row after row; padding positions get 0."""
    grids = [tuple(int(v) for v in g) for g in image_grid_thw]
    B, S = input_ids.shape
    out = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    next_grid = 0
    for b in range(B):
        real = attention_mask[b].bool()
        is_image = (input_ids[b][real] == image_token_id).tolist()
        pieces, pos, i = [], 0, 0
        while i < len(is_image):
            j = i
            if not is_image[i]:  # a run of text
                while j < len(is_image) and not is_image[j]:
                    j += 1
                pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
            else:  # one image
                if next_grid == len(grids):
                    raise ValueError(
                        f"row {b} has more images (runs of image tokens) than image_grid_thw lists "
                        f"({len(grids)})"
                    )
                t, h, w = grids[next_grid]
                next_grid += 1
                gh, gw = h // merge_size, w // merge_size
                j = i + t * gh * gw
                if j > len(is_image) or not all(is_image[i:j]):
                    raise ValueError(
                        f"row {b}: an image of grid {(t, h, w)} needs {t * gh * gw} consecutive image "
                        "tokens; the prompt has a different number"
                    )
                f, r, c = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                pieces.append(torch.stack([f, r, c]).reshape(3, -1) + pos)
                pos += max(gh, gw)
            i = j
        out[:, b, real] = torch.cat(pieces, dim=1).to(out.device)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw lists {len(grids)} images but the prompts hold {next_grid}")
    return out


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight; statistics in fp32, cast back to the input dtype before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, 28, S, 128)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, 4, S, 128)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads.
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, 28, S, 128)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The language model's has no biases, the vision tower's has."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextEncoder(nn.Module):
    """Qwen2.5-VL's language model without its lm_head. Returns the last hidden state, after the final norm.

    `inputs_embeds` and `position_ids` let the vision tower (Edit) put image features in place of
    `<|image_pad|>` tokens and give them 3-D grid positions; text-only callers pass neither."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ):
        """input_ids (B, S), attention_mask (B, S) with 1 = token, 0 = padding -> (B, S, hidden)."""
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(
                f"attention_mask must be {(B, S)} like input_ids, got {tuple(attention_mask.shape)}"
            )
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, hidden)
        if position_ids is None:
            position_ids = text_position_ids(attention_mask)  # (3, B, S)
        cos, sin = mrope_cos_sin(position_ids, self.config, x.dtype)  # (B, S, head_dim)

        if bool(attention_mask.all()):
            mask = None  # plain causal attention (fast kernels)
        else:
            valid = attention_mask.bool()
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            mask = causal[None] & valid[:, None, :]  # (B, S, S): query i sees real keys j <= i
            # A query with no real key before it (left padding) would give NaN, and NaN values
            # poison every later layer even where masked (0 * NaN); let such rows see themselves.
            empty = ~mask.any(dim=-1, keepdim=True)
            mask = mask | (empty & torch.eye(S, dtype=torch.bool, device=x.device))
            mask = mask[:, None]  # (B, 1, S, S), shared by the heads
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Loading text_encoder/
# ---------------------------------------------------------------------------------------------

WEIGHTS_STEM = "model"


def checkpoint_name_to_ours(name: str) -> str | None:
    """Official names -> ours, for both layouts; None for tensors not loaded on purpose.

    legacy (official files):   model.layers.3.mlp.up_proj.weight,  visual.blocks.0...,  lm_head.weight
    transformers 5.x:          model.language_model.layers.3...,   model.visual.blocks.0...
    ours:                      layers.3.mlp.up_proj.weight
    """
    if name.startswith(("visual.", "model.visual.")):
        return None  # the vision tower (Edit) is not part of the text path
    if name.startswith("lm_head."):
        return None  # next-token prediction: never needed here
    for prefix in ("model.language_model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name  # anything else is reported as unexpected


def config_from_json(raw: dict, folder="<config>") -> TextEncoderConfig:
    """Read both the official (transformers 4.x, fields at the top) and the 5.x (`text_config`) forms."""
    if not isinstance(raw.get("text_config", {}), dict):
        raise weights.CheckpointError(f"{folder}/config.json: text_config must be an object of settings")
    text = {**raw, **raw.get("text_config", {})}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise weights.CheckpointError(
            f"{folder}/config.json: rope_scaling / rope_parameters must be an object"
        )
    text.setdefault("rope_theta", rope.get("rope_theta"))
    if "mrope_section" in rope:
        text["mrope_section"] = rope["mrope_section"]
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "mrope_section",
    )
    return weights.config_from_json(
        TextEncoderConfig, {k: text[k] for k in required if text.get(k) is not None}, folder, required
    )


def load(path, device=None, dtype=None, check_finite: bool = True) -> TextEncoder:
    """Load an official `text_encoder/` folder (either key layout); lm_head and visual.* are not read."""
    config = config_from_json(weights.read_config(path), path)
    return weights.load_weights(
        lambda: TextEncoder(config),
        path,
        WEIGHTS_STEM,
        device=device,
        dtype=dtype,
        rename=checkpoint_name_to_ours,
        check_finite=check_finite,
        block_counts={"layers": ("num_hidden_layers", config.num_hidden_layers)},
    )

"""Convert Qwen-Image checkpoint files between layouts, streaming, with every tensor accounted for.

    python weights_convert.py SRC DST [--component transformer|text_encoder|vae|lora] [--dtype bf16|fp8]
                                      [--max-shard-size 5GB] [--prefix PREFIX] [--layout LAYOUT]
                                      [--config CONFIG.json] [--merge-lora FILE[:SCALE] ...] [--overwrite]

What it converts (the direction follows from SRC and DST):

* single file -> official folder: a ComfyUI-style single file becomes the component folder
  (config.json inferred from the tensor shapes + sharded safetensors + index).
  - transformer: `qwen_image_bf16.safetensors` holds the diffusers names, optionally behind a
    `model.diffusion_model.` or `diffusion_model.` prefix. The fp8 files too: plain
    (`qwen_image_fp8_e4m3fn.safetensors`: F8_E4M3 weights) and scaled (each fp8 `<layer>.weight`
    with a `<layer>.scale_weight`, maybe a `<layer>.scale_input`, and a `scaled_fp8` marker tensor;
    see qwenimage_minimal/fp8.py). The fp8 weights and their scales are kept; `scale_input` and the
    marker are not written, and the summary says so and why (the first only scales activations for
    fp8 x fp8 products, which nothing here does; the second only announces the scales).
  - text_encoder: `qwen_2.5_vl_7b.safetensors` holds the official (legacy) Qwen2.5-VL names,
    `model.layers.N.*`, `model.embed_tokens`, `model.norm`, `visual.*`, and maybe `lm_head`.
  - vae: `qwen_image_vae.safetensors` holds the original Wan 2.1 names: `encoder.conv1`,
    `encoder.downsamples.N.residual.K`, `encoder.middle.N`, `encoder.head.N`, `decoder.upsamples.N`
    (one flat list), `conv1`/`conv2` for the quant convs. Folder -> file writes them too.
* official folder -> single file: the reverse (DST ends in .safetensors); `--prefix` adds a prefix.
* LoRA files (`--component lora`): any format lora.py reads -> `--layout diffusers` (default) or
  `comfyui`. `--merge-lora FILE[:SCALE]` (transformer, repeatable) adds a LoRA into the weights
  while converting: W + SCALE * alpha / r * B A, in fp32, then cast (an fp8 weight is dequantised
  first and quantised again: the one way to use a LoRA with fp8 weights).
* folder -> folder: re-shard, cast (`--dtype`), or for the text encoder switch between the
  official legacy key layout and the transformers 5.x one (`--layout transformers5`:
  `model.language_model.*`, `model.visual.*`). Either layout is read.
* fp8 (transformer): `--dtype fp8` writes every Linear weight of the blocks in float8_e4m3fn with
  a per-tensor `scale_weight` (max|W| / 448; weights already in fp8 are kept as they are), the rest
  in bf16. Its config.json stays the diffusers config, but diffusers cannot read such a folder:
  load it with qwenimage_minimal.fp8.load_transformer. `--dtype bf16` (or fp32) from an fp8 source
  dequantises with fp8.dequantize, (q.float() * scale).to(dtype), giving a folder diffusers reads
  whose bf16 weights are exactly the ones FP8Linear computes with. A file written from a scaled
  folder gets a 2-element `scaled_fp8` marker, ComfyUI's sign for "dequantise, multiply in bf16".

Rules: tensors are read and written one at a time (peak memory is one tensor, not the model);
an unknown or missing tensor is an error, never a skip (the text encoder's `lm_head` may be
absent; `visual.*` must be complete or absent); nothing is overwritten without `--overwrite`;
a summary is printed. Safetensors only.

Nothing is lost. The output is written beside DST under a temporary name, re-read and checked
against the inputs, and only then put in place of DST: a full disk, an error or a kill while
writing leaves the previous DST as it was (and the next run clears the leftover). Only a kill in
the last moment, while the old files are swapped for the new ones (a few renames), can leave DST
half old, half new; the old files then wait in a hidden `.DST.*.old` folder beside it. With `--overwrite` only the files
the conversion writes (the weight files, their index, config.json) are replaced; the source is
never among them (converting a folder's own file into that folder is refused).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qwenimage_minimal import fp8, lora, mmdit, text_encoder, vae, vision, weights, writing


@dataclass
class Component:
    """How one component's tensors are named in the official folder and elsewhere."""

    name: str
    stem: str  # official weight file stem
    prefixes: tuple[str, ...]  # prefixes single files may carry
    expected: Callable[[dict], dict[str, tuple[int, ...]]]  # config -> every allowed official name -> shape
    infer_config: Callable[[dict[str, tuple[int, ...]]], dict]  # official name -> shape  => config.json dict
    may_be_absent: Callable[[str], bool] = lambda name: False  # allowed names a checkpoint may lack
    # any accepted naming -> official names (given all names of the file: some mappings depend on the set)
    to_official: Callable[[list[str]], dict[str, str]] = lambda names: {n: n for n in names}
    # output layouts: official name (and the config) -> name written
    layouts: dict[str, Callable[[str, dict], str]] = field(
        default_factory=lambda: {"official": lambda name, config: name}
    )
    all_or_none: tuple[str, ...] = ()  # name prefixes that are complete or absent
    file_layout: str | None = None  # the layout single files use, if not the official

    @property
    def folder_layout(self) -> str:  # the official folder's layout
        return next(iter(self.layouts))


# --- transformer --------------------------------------------------------------------------


def _transformer_expected(config_json: dict) -> dict[str, tuple[int, ...]]:
    config = weights.config_from_json(
        mmdit.MMDiTConfig,
        config_json,
        "<config>",
        mmdit.REQUIRED_FIELDS,
        must_be_false=mmdit.UNSUPPORTED_FLAGS,
    )
    model = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _transformer_infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Read the architecture off the tensor shapes (only zero_cond_t cannot be seen in them)."""
    need = ["img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight"]
    absent = [k for k in need if k not in shapes]
    if absent:
        raise weights.CheckpointError(f"not a Qwen-Image transformer checkpoint: no {absent}")
    dim, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if head_dim != 128:
        raise weights.CheckpointError(
            f"attention_head_dim {head_dim} is not the official 128, so the RoPE axes "
            "cannot be inferred: pass --config with a config.json"
        )
    config = mmdit.MMDiTConfig(
        in_channels=in_channels,
        num_layers=weights.count_blocks(shapes, "transformer_blocks"),
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        out_channels=shapes["proj_out.weight"][0] // 4,
    )
    return config.to_json()


# --- text encoder (Qwen2.5-VL) --------------------------------------------------------------


def _text_encoder_expected(config_json: dict) -> dict[str, tuple[int, ...]]:
    """The official (legacy) names: the language model ours loads, lm_head, and the vision tower
    (built from vision_config, when the config has one)."""
    config = text_encoder.config_from_json(config_json)
    model = weights.build_on_meta(lambda: text_encoder.TextEncoder(config))
    names = {"model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    names["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    if "vision_config" in config_json:
        tower = weights.build_on_meta(lambda: vision.VisionTower(vision.config_from_json(config_json)))
        names.update({"visual." + k: tuple(v.shape) for k, v in tower.state_dict().items()})
    return names


def _text_encoder_infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The official config.json form (transformers 4.x: text fields at the top), read off the shapes;
    head_dim 128, rope theta 1e6 and the M-RoPE sections are Qwen2.5-VL's constants."""
    need = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
    ]
    absent = [k for k in need if k not in shapes]
    if absent:
        raise weights.CheckpointError(f"not a Qwen2.5-VL text encoder checkpoint: no {absent}")
    vocab, hidden = shapes["model.embed_tokens.weight"]
    head_dim = 128
    if hidden % head_dim:
        raise weights.CheckpointError(
            f"hidden_size {hidden} is not a multiple of Qwen2.5-VL's head_dim 128, so the heads cannot be "
            "inferred: pass --config with a config.json"
        )
    config = text_encoder.TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=weights.count_blocks(shapes, "model.layers"),
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
    )
    vision_config = None
    if "visual.patch_embed.proj.weight" in shapes:
        d, in_channels, tp, p, _ = shapes["visual.patch_embed.proj.weight"]
        merged = shapes["visual.merger.mlp.0.weight"][0]
        vision_config = vision.VisionConfig(
            depth=weights.count_blocks(shapes, "visual.blocks"),
            hidden_size=d,
            in_channels=in_channels,
            intermediate_size=shapes["visual.blocks.0.mlp.gate_proj.weight"][0],
            num_heads=d // 80,
            out_hidden_size=shapes["visual.merger.mlp.2.weight"][0],
            patch_size=p,
            temporal_patch_size=tp,
            spatial_merge_size=int(round((merged / d) ** 0.5)),
        ).to_json()
    return config.to_json(vision_config)


def _text_encoder_to_official(names: list[str]) -> dict[str, str]:
    return {n: _text_encoder_name_to_official(n) for n in names}


def _text_encoder_name_to_official(name: str) -> str:
    """transformers 5.x names -> the official legacy names; legacy names stay."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _text_encoder_to_transformers5(name: str, config: dict) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


# --- VAE: diffusers names (the official folder) <-> the original Wan 2.1 names (ComfyUI files) -

# Inside a residual block, Wan numbers the layers of one nn.Sequential: RMS_norm(0), SiLU(1),
# CausalConv3d(2), RMS_norm(3), SiLU(4), Dropout(5), CausalConv3d(6); diffusers names them.
_WAN_RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_DIFFUSERS_RESIDUAL = {wan: official for official, wan in _WAN_RESIDUAL.items()}
_WAN_TOP = {
    "encoder.conv_in.": "encoder.conv1.",
    "decoder.conv_in.": "decoder.conv1.",
    "quant_conv.": "conv1.",
    "post_quant_conv.": "conv2.",
    "encoder.norm_out.": "encoder.head.0.",
    "encoder.conv_out.": "encoder.head.2.",
    "decoder.norm_out.": "decoder.head.0.",
    "decoder.conv_out.": "decoder.head.2.",
}


def _vae_to_wan(name: str, config: dict) -> str:
    """Official (diffusers) VAE name -> Wan name. The decoder is one flat list in Wan: per up block,
    num_res_blocks + 1 residual blocks then the upsampler, so block i starts at i * (R + 2)."""
    R = config["num_res_blocks"]
    for official, wan in _WAN_TOP.items():
        if name.startswith(official):
            return wan + name[len(official) :]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        side, kind, i, rest = m.groups()
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"  # middle = [resnet, attention, resnet]
        return f"{side}.middle.{2 * int(i)}.{_WAN_RESIDUAL.get(rest, rest)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", name):
        return f"encoder.downsamples.{m[1]}.{_WAN_RESIDUAL.get(m[2], m[2])}"  # same flat list; resamplers keep names
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.upsamples.{int(m[1]) * (R + 2) + int(m[2])}.{_WAN_RESIDUAL.get(m[3], m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        return f"decoder.upsamples.{int(m[1]) * (R + 2) + R + 1}.{m[2]}"
    return name


def _wan_to_vae(name: str, R: int) -> str:
    """Wan VAE name -> official name (the inverse of _vae_to_wan); unknown names come back unchanged."""
    for official, wan in _WAN_TOP.items():
        if name.startswith(wan):
            return official + name[len(wan) :]
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d+)\.(.+)", name):
        side, slot, rest = m[1], int(m[2]), m[3]
        if slot == 1:
            return f"{side}.mid_block.attentions.0.{rest}"
        return f"{side}.mid_block.resnets.{slot // 2}.{_DIFFUSERS_RESIDUAL.get(rest, rest)}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", name):
        return f"encoder.down_blocks.{m[1]}.{_DIFFUSERS_RESIDUAL.get(m[2], m[2])}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", name):
        block, slot = divmod(int(m[1]), R + 2)
        if slot <= R:
            return f"decoder.up_blocks.{block}.resnets.{slot}.{_DIFFUSERS_RESIDUAL.get(m[2], m[2])}"
        return f"decoder.up_blocks.{block}.upsamplers.0.{m[2]}"
    return name


def _vae_to_official(names: list[str]) -> dict[str, str]:
    if "encoder.conv1.weight" not in names:  # already diffusers names
        return {n: n for n in names}
    resamples = [int(m[1]) for n in names if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", n))]
    if not resamples:
        raise weights.CheckpointError("a Wan-style VAE file without encoder.downsamples.N.resample tensors")
    R = min(resamples)  # residual blocks before the first resample
    return {n: _wan_to_vae(n, R) for n in names}


def _vae_expected(config_json: dict) -> dict[str, tuple[int, ...]]:
    config = vae.config_from_json(config_json)
    model = weights.build_on_meta(lambda: vae.QwenImageVAE(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _vae_infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Architecture from the shapes; latents_mean/std are not weights: the official values are used."""
    if "encoder.conv_in.weight" not in shapes or "post_quant_conv.weight" not in shapes:
        raise weights.CheckpointError(
            "not a Qwen-Image / Wan VAE checkpoint: no encoder.conv_in / post_quant_conv"
        )
    base_dim, in_channels = shapes["encoder.conv_in.weight"][:2]
    blocks = weights.count_blocks(shapes, "encoder.down_blocks")
    resamples = [i for i in range(blocks) if f"encoder.down_blocks.{i}.resample.1.weight" in shapes]
    R = resamples[0]
    stages = len(resamples) + 1
    dim_mult = [
        shapes[f"encoder.down_blocks.{s * (R + 1)}.conv1.weight"][0] // base_dim for s in range(stages)
    ]
    config = vae.VAEConfig(
        base_dim=base_dim,
        z_dim=shapes["post_quant_conv.weight"][0],
        dim_mult=dim_mult,
        num_res_blocks=R,
        input_channels=in_channels,
        temperal_downsample=[f"encoder.down_blocks.{i}.time_conv.weight" in shapes for i in resamples],
    )
    return config.to_json()


COMPONENTS = {
    "transformer": Component(
        "transformer",
        mmdit.WEIGHTS_STEM,
        ("model.diffusion_model.", "diffusion_model."),
        _transformer_expected,
        _transformer_infer_config,
    ),
    "text_encoder": Component(
        "text_encoder",
        text_encoder.WEIGHTS_STEM,
        (),
        _text_encoder_expected,
        _text_encoder_infer_config,
        may_be_absent=lambda name: name == "lm_head.weight" or name.startswith("visual."),
        to_official=_text_encoder_to_official,
        layouts={"legacy": lambda name, config: name, "transformers5": _text_encoder_to_transformers5},
        all_or_none=("visual.",),
    ),
    "vae": Component(
        "vae",
        vae.WEIGHTS_STEM,
        ("first_stage_model.", "vae."),
        _vae_expected,
        _vae_infer_config,
        to_official=_vae_to_official,
        layouts={"diffusers": lambda name, config: name, "wan": _vae_to_wan},
        file_layout="wan",
    ),
}


# --- which component a source holds -----------------------------------------------------------

# Told by what is cheap to read: a folder's config.json (diffusers' _class_name, transformers' model_type)
# or a file's tensor names (prefixes stripped). Checked first, so that a transformer given as
# --component vae is named as such, not reported as a config without base_dim or a folder without
# model.safetensors.
CLASS_NAMES = {"QwenImageTransformer2DModel": "transformer", "AutoencoderKLQwenImage": "vae"}
NAME_STARTS = {
    "transformer": ("transformer_blocks.", "img_in.", "txt_in."),
    "vae": (
        "encoder.conv",
        "decoder.conv",
        "post_quant_conv.",
        "encoder.down_blocks.",
        "encoder.downsamples.",
    ),
    "text_encoder": ("model.layers.", "model.embed_tokens.", "model.language_model."),
}
LORA_MARKS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")
SAID = {"transformer": "transformer", "vae": "VAE", "text_encoder": "text encoder", "lora": "LoRA"}
EXPECTED = {  # as the shape checks say it
    "transformer": "a Qwen-Image transformer checkpoint",
    "vae": "a Qwen-Image / Wan VAE checkpoint",
    "text_encoder": "a Qwen2.5-VL text encoder checkpoint",
    "lora": "a LoRA",
}


def _component_of(src: Path) -> tuple[str | None, str]:
    """(the component src holds: transformer, vae, text_encoder, lora or root; the evidence), or
    (None, "") when it cannot be told cheaply (the full checks then decide)."""
    if src.is_dir():
        if (src / "model_index.json").is_file():
            return "root", "model_index.json"
        try:
            config = weights.parse_json((src / "config.json").read_bytes(), src / "config.json")
        except (OSError, weights.CheckpointError):
            return None, ""
        if not isinstance(config, dict):
            return None, ""
        if config.get("_class_name") in CLASS_NAMES:
            return CLASS_NAMES[config["_class_name"]], f"config.json: _class_name {config['_class_name']!r}"
        if str(config.get("model_type", "")).startswith("qwen2"):
            return "text_encoder", f"config.json: model_type {config['model_type']!r}"
        return None, ""
    if src.suffix != ".safetensors" or not src.is_file():
        return None, ""
    names = weights.SafetensorsFile(src).keys()  # a corrupt file is named here
    lora_names = [n for n in names if any(m in n for m in LORA_MARKS)]
    if lora_names and all(n in lora_names or n.endswith(".alpha") for n in names):  # a LoRA holds only these
        return "lora", f"tensor {lora_names[0]!r}"
    prefixes = sorted({p for c in COMPONENTS.values() for p in c.prefixes}, key=len, reverse=True)
    for name in names:
        bare = next((name[len(p) :] for p in prefixes if name.startswith(p)), name)
        for component, starts in NAME_STARTS.items():
            if bare.startswith(starts):
                return component, f"tensor {name!r}"
    return None, ""


def _check_component(src: Path, component: str) -> None:
    """Refuse a source that holds another component than --component says, naming the right one."""
    kind, evidence = _component_of(src)
    if kind is None or kind == component:
        return
    if kind == "root":
        raise weights.CheckpointError(
            f"{src} is a model root ({evidence}), not one component: pass its component folder, "
            f"e.g. {src / (component if component != 'lora' else 'transformer')}"
        )
    fix = (
        f"pass --component lora to convert it, or --merge-lora {src} to add it into a transformer"
        if kind == "lora"
        else f"pass --component {kind}"
    )
    raise weights.CheckpointError(
        f"{src} is not {EXPECTED[component]}: it holds a {SAID[kind]} ({evidence}); {fix}"
    )


# --- fp8 (transformer only; see qwenimage_minimal/fp8.py for the format) ---------------------

MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled-fp8 file, at the model's key prefix


def _take_fp8_extras(sources: dict, headers: dict) -> tuple[dict, dict]:
    """Take ComfyUI's scaled-fp8 companions out of `sources`: -> ({layer: (file, name) of its
    scale_weight}, {name in the source: why it is not written}). A companion of a weight the source
    lacks stays, and is then reported as unknown."""
    scales, dropped = {}, {}
    for name in list(sources):
        path, in_name = sources[name]
        layer = name.rpartition(".")[0]
        if name == MARKER:
            dropped[in_name] = (
                f"the scaled-fp8 marker ({str(headers[path].dtype(in_name))[6:]}, "
                f"{math.prod(headers[path].shape(in_name))} elements) says only that scales follow; "
                "a file written from the folder gets a new one"
            )
        elif name.endswith(".scale_input") and layer + ".weight" in sources:
            dropped[in_name] = (
                "the activation scale serves only fp8 x fp8 matrix products (torch._scaled_mm); "
                "this project multiplies in bf16, so it changes nothing here"
            )
        elif name.endswith(fp8.SCALE):
            scales[layer] = sources[name]
        else:
            continue
        del sources[name]
    return scales, dropped


class _Fp8Plan:
    """Which tensors the output holds in fp8, and in what order the names are written.

    --dtype fp8: every block Linear weight in fp8 with a scale_weight (fp8 ones kept, others
                 quantised per tensor), everything else in bf16.
    no --dtype:  fp8 weights stay fp8 with their scales (a LoRA merged into one re-quantises it).
    --dtype bf16/fp32/fp16: nothing in fp8; fp8 weights are dequantised."""

    def __init__(self, order, expected, in_dtype, scales, merged, dtype, to_file):
        linear = {n for n in order if n.endswith(".weight") and len(expected[n]) == 2}
        is_fp8 = {n for n in order if in_dtype[n] in weights.FP8_DTYPES}
        if dtype == fp8.FP8:
            fp8_out = {n for n in linear if n.startswith("transformer_blocks.")}
        else:
            fp8_out = linear & is_fp8 if dtype is None else set()
        self.merged = merged
        self.quantized = {n for n in fp8_out if n not in is_fp8 or n in merged}
        self.kept_fp8 = fp8_out - self.quantized
        self.compute = torch.bfloat16 if dtype == fp8.FP8 else dtype
        self.in_dtype = in_dtype
        self.scale_of = {
            n: n[: -len(".weight")] + fp8.SCALE
            for n in order
            if n in fp8_out and (dtype == fp8.FP8 or n in self.quantized or n[: -len(".weight")] in scales)
        }
        self.weight_of = {s: n for n, s in self.scale_of.items()}
        self.marker = to_file and bool(self.scale_of)  # so that ComfyUI reads the scales
        self.names = [m for n in order for m in (n, self.scale_of.get(n)) if m] + (
            [MARKER] if self.marker else []
        )

    def out_dtype(self, n: str) -> torch.dtype:
        if n == MARKER:
            return fp8.FP8
        if n in self.weight_of:
            return torch.float32
        if n in self.quantized:
            return fp8.FP8
        if n in self.kept_fp8 or self.compute is None or not self.in_dtype[n].is_floating_point:
            return self.in_dtype[n]
        return self.compute


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def _source_tensors(src: Path, comp: Component, prefix: str | None):
    """Official name -> (file, name in file), for a single file or a component folder (any layout)."""
    if src.is_dir():
        files = {name: (path, name) for name, path in weights.weight_files(src, comp.stem).items()}
        used = ""
    else:
        names = weights.SafetensorsFile(src).keys()
        found = [p for p in comp.prefixes if any(n.startswith(p) for n in names)]
        if prefix is None and len(found) > 1:
            raise weights.CheckpointError(f"{src} mixes key prefixes {found}; pass --prefix to choose one")
        used = prefix if prefix is not None else (found[0] if found else "")
        for name in names:
            if not name.startswith(used):
                raise weights.CheckpointError(
                    f"{src}: tensor {name!r} lacks the prefix {used!r} that the others carry"
                )
        files = {name: (src, name) for name in names}
    mapping = {}
    renamed = comp.to_official([name[len(used) :] for name in files])
    for name, where in files.items():
        official = renamed[name[len(used) :]]
        if official in mapping:
            raise weights.CheckpointError(f"{src}: {mapping[official][1]!r} and {name!r} are the same tensor")
        mapping[official] = where
    return mapping, used


def _check_complete(src, comp: Component, shapes: dict, expected: dict, file_names: dict) -> None:
    """Every tensor accounted for: nothing unknown, nothing required missing, every shape right.
    Unknown tensors are named as the source file names them."""
    unknown = sorted(file_names[n] for n in set(shapes) - set(expected))
    missing = sorted(n for n in expected if n not in shapes and not comp.may_be_absent(n))
    for group in comp.all_or_none:  # e.g. the vision tower: all of it or none of it
        if any(n.startswith(group) for n in shapes):
            missing += sorted(n for n in expected if n.startswith(group) and n not in shapes)
    wrong = sorted(
        f"{k}: {list(shapes[k])} vs {list(expected[k])}"
        for k in set(shapes) & set(expected)
        if shapes[k] != expected[k]
    )
    if unknown or missing or wrong:
        raise weights.CheckpointError(
            weights.describe_mismatch(
                src, missing, unknown, wrong, problem=f"are not a complete {comp.name} checkpoint"
            )
        )


def convert(
    src,
    dst,
    component: str = "transformer",
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 2**30,
    prefix: str | None = None,
    config_path=None,
    overwrite: bool = False,
    layout: str | None = None,
    log=print,
    merge_lora=(),
) -> dict:
    """Convert SRC to DST (see the module docstring). Returns the summary as a dict.
    merge_lora: [(LoRA file, scale)] added into the transformer's weights on the way."""
    src, dst = Path(src), Path(dst)
    if component == "lora":
        if merge_lora or dtype is not None or prefix is not None or config_path:
            raise ValueError(
                "--component lora converts one LoRA file between layouts: --merge-lora, --dtype, "
                "--prefix and --config do not apply"
            )
        return convert_lora(src, dst, layout or "diffusers", overwrite, log)
    if dtype in weights.FP8_DTYPES and (dtype != fp8.FP8 or component != "transformer"):
        raise ValueError(
            "--dtype fp8 writes the transformer's block Linear weights in float8_e4m3fn: it applies "
            "to --component transformer only"
        )
    comp = COMPONENTS[component]
    to_file = dst.suffix == ".safetensors"
    layout = layout or ((comp.file_layout or comp.folder_layout) if to_file else comp.folder_layout)
    if layout not in comp.layouts:
        raise ValueError(f"--layout {layout!r}: the {component} has layouts {sorted(comp.layouts)}")
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    _check_component(src, component)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve():
        raise ValueError("source and destination are the same path")
    if dst.exists() and dst.is_dir() == to_file:
        raise FileExistsError(
            f"{dst} exists and is a {'folder' if dst.is_dir() else 'file'}, but the output is a "
            f"{'file' if to_file else 'folder'}: choose another destination"
        )
    replaced = [dst] if to_file else _outputs_in(dst, comp.stem)
    if any(src.resolve() == old.resolve() for old in replaced if old.exists()):
        raise ValueError(
            f"the source {src} is one of the files that converting into {dst} replaces: write the "
            "output to another folder (and move it afterwards)"
        )
    writing.check_writable_folder(dst.parent, f"cannot write {dst}")

    sources, stripped = _source_tensors(src, comp, None if src.is_dir() else prefix)
    headers = {path: weights.SafetensorsFile(path) for path in {p for p, _ in sources.values()}}
    tensors_read = len(sources)
    scales, dropped = _take_fp8_extras(sources, headers) if component == "transformer" else ({}, {})
    shapes = {name: headers[p].shape(n) for name, (p, n) in sources.items()}
    in_dtype = {name: headers[p].dtype(n) for name, (p, n) in sources.items()}

    # The config: given, read from the source folder, or inferred from the shapes.
    if config_path:
        config_json = weights.parse_json(Path(config_path).read_bytes(), config_path)
        if not isinstance(config_json, dict):
            raise weights.CheckpointError(f"--config {config_path}: expected a JSON object of settings")
    elif src.is_dir():
        config_json = weights.read_config(src)
    else:
        config_json = comp.infer_config(shapes)
    expected = comp.expected(config_json)
    if merge_lora and component != "transformer":
        raise ValueError("--merge-lora merges into a transformer: pass --component transformer")
    merges = _lora_deltas(merge_lora, config_json) if merge_lora else {}
    for layer, (path, in_name) in scales.items():  # each beside an fp8 Linear weight, one number
        weight = layer + ".weight"
        fp8.check_scale(
            src,
            in_name,
            headers[path].dtype(in_name),
            headers[path].shape(in_name),
            in_dtype.get(weight),
            len(expected.get(weight, ())) == 2,
        )
    _check_complete(src, comp, shapes, expected, {n: where[1] for n, where in sources.items()})

    order = [n for n in expected if n in shapes]  # module order, as the reference writes its shards
    plan = _Fp8Plan(order, expected, in_dtype, scales, {m + ".weight" for m in merges}, dtype, to_file)
    out_shape = {
        **shapes,
        **{s: () for s in plan.scale_of.values()},
        **({MARKER: (2,)} if plan.marker else {}),
    }
    names = plan.names
    out_dtype = {n: plan.out_dtype(n) for n in names}
    sizes = {n: math.prod(out_shape[n]) * out_dtype[n].itemsize for n in names}
    out_prefix = (prefix or "") if to_file else ""
    out_name = {n: out_prefix + (n if n == MARKER else comp.layouts[layout](n, config_json)) for n in names}

    def read(n):
        path, in_name = sources[n]
        try:
            return headers[path].read(in_name)
        except OSError as e:  # a read error is the source's, not the output's
            raise weights.CheckpointError(f"cannot read {in_name!r} from {path}: {e}") from None

    def scale(n):  # the scale of the fp8 tensor n as stored (1 if none)
        layer = n[: -len(".weight")] if n.endswith(".weight") else None
        if layer not in scales:
            return torch.ones(())
        path, in_name = scales[layer]
        return fp8.read_scale(src, in_name, headers[path].read(in_name))

    pending = {}  # weight -> the scale to write right after it

    def tensors(names):  # read, cast or (de)quantise, hand over: one tensor in memory at a time
        for n in names:
            if n == MARKER:
                yield torch.zeros(2, dtype=fp8.FP8)
            elif n in plan.weight_of:  # a scale, after its weight
                yield pending.pop(plan.weight_of[n])
            elif n in plan.kept_fp8:  # fp8 bytes as they are
                if n in plan.scale_of:
                    pending[n] = scale(n)
                yield read(n)
            else:
                tensor = read(n)
                if tensor.dtype in weights.FP8_DTYPES:  # the reference formula
                    exact = n in plan.merged or n in plan.quantized
                    tensor = fp8.dequantize(tensor, scale(n), torch.float32 if exact else out_dtype[n])
                if n in plan.merged:
                    tensor = tensor.float() + sum(delta() for delta in merges[n[: -len(".weight")]])
                if n in plan.quantized:
                    tensor, pending[n] = fp8.quantize_weight(tensor)
                yield tensor.to(out_dtype[n])

    for leftover in dst.parent.glob(f".{dst.name}.*.partial"):  # an interrupted earlier run's
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    needed = sum(sizes.values())
    free = shutil.disk_usage(dst.parent).free
    if needed > free:
        raise writing.OutputError(
            28,
            f"cannot write {dst}: it needs {needed / 2**30:.2f} GiB and the disk has "
            f"{free / 2**30:.2f} GiB free; nothing was changed",
        )

    # Write everything under a temporary name beside dst, check it, then put it in place.
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    os.chmod(staging, 0o777 & ~writing.current_umask())  # it may become dst: a plain folder's permissions
    try:
        with writing.output_errors(dst):
            header = [(out_name[n], out_shape[n], out_dtype[n]) for n in names]
            if to_file:
                written = [staging / dst.name]
                writing.write_safetensors(written[0], header, tensors(names))
            else:  # the official layout: one file or shards + index, config.json
                written = writing.write_folder(
                    staging,
                    comp.stem,
                    writing.plan_shards(header, max_shard_size),
                    tensors(names),
                    config_json,
                )
        _verify(written, {out_name[n]: (out_shape[n], sizes[n]) for n in names})
        with writing.output_errors(dst):
            files = _put_in_place(staging, written, dst, replaced, to_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    files = [f for f in files if f.suffix == ".safetensors"]
    summary = {
        "component": component,
        "tensors_read": tensors_read,
        "tensors_written": len(names),
        "params": sum(math.prod(s) for s in shapes.values()),
        "bytes_written": sum(sizes.values()),
        "files": [str(f) for f in files],
        "dtypes": sorted({str(d).replace("torch.", "") for d in out_dtype.values()}),
        "prefix_stripped": stripped,
        "absent": sorted(n for n in expected if n not in shapes),
        "fp8_weights": len(plan.kept_fp8) + len(plan.quantized),
        "scales_written": len(plan.scale_of),
        "dequantized": sorted(
            n for n in order if in_dtype[n] in weights.FP8_DTYPES and out_dtype[n] not in weights.FP8_DTYPES
        ),
        "dropped": dropped,
        "marker_written": plan.marker,
    }
    log(
        f"{component}: {summary['tensors_read']} tensors read from {src}"
        + (f" (prefix {stripped!r} stripped)" if stripped else "")
    )
    log(
        f"  {summary['tensors_written']} written to {len(files)} file(s) under {dst}: "
        f"{summary['params'] / 1e9:.2f} B params, {summary['bytes_written'] / 2**30:.2f} GiB, "
        f"dtype {', '.join(summary['dtypes'])}" + (f", {layout} key layout" if len(comp.layouts) > 1 else "")
    )
    if summary["absent"]:
        log(f"  not in the source (allowed): {len(summary['absent'])} tensors, e.g. {summary['absent'][:3]}")
    if summary["fp8_weights"]:
        marker = ", the scaled_fp8 marker (2 elements: ComfyUI dequantises and multiplies in bf16)"
        log(
            f"  fp8: {summary['fp8_weights']} weights in float8 ({len(plan.quantized)} quantised here, per tensor), "
            f"{summary['scales_written']} scale_weight tensors" + (marker if plan.marker else "")
        )
    if summary["dequantized"]:
        log(
            f"  {len(summary['dequantized'])} fp8 tensors dequantised to {str(plan.compute)[6:]}: "
            "(q.float() * scale_weight).to(dtype), as fp8.dequantize"
        )
    for reason, group in itertools.groupby(
        sorted(dropped.items(), key=lambda kv: kv[1]), key=lambda kv: kv[1]
    ):
        group = [name for name, _ in group]
        log(f"  not written: {len(group)} tensor(s), e.g. {group[:2]}: {reason}")
    return summary


def _lora_deltas(merge_lora, config_json: dict) -> dict:
    """{module: [functions giving SCALE * alpha / r * B A]} for the LoRAs to merge, checked against the
    transformer the config describes (built on meta) before anything is written."""
    config = weights.config_from_json(mmdit.MMDiTConfig, config_json, "<config>", mmdit.REQUIRED_FIELDS)
    model = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    deltas: dict[str, list] = {}
    for path, scale in merge_lora:
        lora.check_scale(scale, "--merge-lora scale")
        kind, evidence = _component_of(Path(path))
        if kind not in (None, "lora"):
            raise weights.CheckpointError(
                f"--merge-lora {path}: it holds a {SAID.get(kind, 'model root')} ({evidence}), not a LoRA"
            )
        adapters, _ = lora.read_lora(path, model)  # every value checked there (finite, alpha > 0)
        lora.check_fits(model, adapters)
        for module, (A, B, alpha) in adapters.items():
            deltas.setdefault(module, []).append(
                lambda A=A, B=B, k=scale * alpha / A.shape[0]: (B.float() @ A.float()) * k
            )
    return deltas


def convert_lora(src: Path, dst: Path, layout: str, overwrite: bool, log=print) -> dict:
    """A LoRA file in any format lora.py reads -> the diffusers or the ComfyUI layout, alphas kept."""
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: a LoRA is written to one .safetensors file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve():
        raise ValueError("source and destination are the same path")
    _check_component(src, "lora")
    if src.is_dir():
        raise ValueError(f"{src} is a folder: a LoRA is one .safetensors file")
    model = weights.build_on_meta(lambda: mmdit.MMDiT(mmdit.MMDiTConfig()))  # the official module names
    adapters, fmt = lora.read_lora(src, model)
    lora.write_lora(dst, adapters, format=layout)
    log(f"lora: {len(adapters)} adapted modules read from {src} ({fmt}); written to {dst} ({layout} layout)")
    return {"component": "lora", "modules": len(adapters), "format_read": fmt, "files": [str(dst)]}


def _outputs_in(folder: Path, stem: str) -> list[Path]:
    """The files a conversion into `folder` writes, and so replaces: the weights (single, shards,
    index) and config.json. Exact names only: other files in the folder are never touched."""
    if not folder.is_dir():
        return []
    shard = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors")
    return [
        p
        for p in folder.iterdir()
        if shard.fullmatch(p.name) or p.name in (f"{stem}.safetensors.index.json", "config.json")
    ]


def _verify(files: list[Path], planned: dict) -> None:
    """Re-read what was written: exactly the planned names, shapes and byte counts, each once."""
    written = {}
    for f in files:
        if f.suffix != ".safetensors":
            continue
        h = weights.SafetensorsFile(f)
        for k in h.keys():
            if k in written:
                raise writing.OutputError(
                    errno.EIO, f"tensor {k} was written twice; nothing was put in place"
                )
            written[k] = (h.shape(k), h.nbytes(k))
    if written != planned:
        raise writing.OutputError(
            errno.EIO,
            "the written files do not hold exactly the planned tensors (a faulty "
            "disk?); nothing was put in place",
        )


def _put_in_place(
    staging: Path, written: list[Path], dst: Path, replaced: list[Path], to_file: bool
) -> list[Path]:
    """Move the checked output from `staging` to `dst`, replacing the old output only now. The old
    files wait in a backup folder until the new ones are all in place, and come back on an error."""
    if to_file:
        os.replace(written[0], dst)  # one rename: atomic
        return [dst]
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dst)  # one rename of the whole folder: atomic
        return [dst / f.name for f in written]
    backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    moved = []
    try:
        for old in replaced:
            os.replace(old, backup / old.name)
            moved.append(old)
        for f in written:
            os.replace(f, dst / f.name)
    except BaseException:
        for f in written:  # take back what had arrived
            if not f.exists() and (dst / f.name).exists():
                os.replace(dst / f.name, f)
        for old in moved:  # and restore the old output
            os.replace(backup / old.name, old)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return [dst / f.name for f in written]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("src", help="a .safetensors file or an official component folder")
    p.add_argument("dst", help="a component folder, or a .safetensors file for a single-file output")
    p.add_argument("--component", default="transformer", choices=sorted([*COMPONENTS, "lora"]))
    p.add_argument(
        "--dtype",
        choices=sorted([*weights.DTYPES_BY_NAME, "fp8"]),
        help="cast floating tensors (default: keep); fp8: the transformer's block Linear weights in "
        "float8_e4m3fn with per-tensor scales, the rest in bf16",
    )
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    p.add_argument("--prefix", help="key prefix of the single file (read: detected by default; write: none)")
    p.add_argument("--config", help="config.json to use instead of inferring it from the tensor shapes")
    p.add_argument(
        "--layout",
        help="key layout to write. text_encoder: legacy (official) or transformers5; "
        "vae: diffusers (official) or wan. Default: the official layout for a "
        "folder, the usual single-file layout (vae: wan) for a file",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--merge-lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="add a LoRA into the transformer's weights while converting; repeatable",
    )
    a = p.parse_args(argv)
    try:
        merges = [lora.parse_file_and_scale(text) for text in a.merge_lora]
        dtype = fp8.FP8 if a.dtype == "fp8" else weights.DTYPES_BY_NAME.get(a.dtype)
        convert(
            a.src,
            a.dst,
            a.component,
            dtype,
            a.max_shard_size,
            a.prefix,
            a.config,
            a.overwrite,
            a.layout,
            merge_lora=merges,
        )
    except (weights.CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

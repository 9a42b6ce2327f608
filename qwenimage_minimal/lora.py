"""LoRA: low-rank adapters on the MMDiT's Linear layers, and the LoRA files people share.

A LoRA leaves the pretrained weight W (out, in) alone and adds a product of two thin matrices:

    y = W x + b + sum over adapters:  s * (alpha / r) * B (A x)
        A (r, in)  "down", B (out, r)  "up", r << in, out;  s the user's scale (set_adapters, --lora PATH:SCALE)

Training starts with B = 0 (the model is unchanged at step 0) and A random, and learns only A and
B: r * (in + out) numbers per layer instead of in * out. Fusing adds s * alpha / r * B A into W (in
W's dtype), so sampling costs nothing extra; unfusing puts back the W saved before, bit for bit.

Files come in several key layouts; each is read into one form, {module: (A, B, alpha)}, and every
tensor must be accounted for (an unknown key, a module the model does not have, or a shape that
does not fit is an error that names it, and nothing is applied):

    diffusers / PEFT     transformer.<module>.lora_A.weight, .lora_B.weight; r and lora_alpha in the
                         safetensors header (lora_adapter_metadata); an .alpha tensor if present
    ComfyUI, ai-toolkit  diffusion_model.<module>.lora_A.weight / .lora_B.weight (or .lora_down /
                         .lora_up), optional .alpha
    kohya, musubi-tuner  lora_unet_<module with "_" for ".">.lora_down.weight, .lora_up.weight, .alpha
    DiffSynth-Studio     <module>.lora_A.default.weight, .lora_B.default.weight
    Qwen-Image-Lightning <module>.lora_down.weight, .lora_up.weight, .alpha

Without an alpha, alpha = r (scale 1), as every trainer above assumes. The values are checked where they
are read: A and B floating point and finite, alpha finite and > 0, the user's scale finite and at most
MAX_SCALE in size; any of these wrong would otherwise give a black (NaN) or burnt picture and no error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import weights, writing

# Which Linear layers of the blocks get adapters (module-name suffixes, as PEFT's target_modules).
ATTENTION_IMAGE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
ATTENTION_TEXT = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
TARGET_PRESETS = {
    "diffusers": ATTENTION_IMAGE,  # the DreamBooth script's default
    "attention": ATTENTION_IMAGE + ATTENTION_TEXT,  # both streams' attention
    "all-linear": None,  # every Linear in the blocks (ai-toolkit)
    "all-linear-no-mod": None,  # ... but the *_mod layers (musubi-tuner)
}


class LoRALinear(nn.Linear):
    """An nn.Linear with named low-rank adapters beside it. `weight` and `bias` are the very tensors
    of the Linear it replaces and keep their names, so the model's own parameters load, save and
    train as before; the adapters live under `lora_A.<name>` / `lora_B.<name>`."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B, self.dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # alpha / r of each adapter
        self.scale: dict[str, float] = {}  # the user's weight of each adapter; 0 = off
        self.fused: set[str] = set()  # adapters added into `weight`
        self.weight_before_fusing: torch.Tensor | None = None

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float = 0.0):
        r = A.shape[0]
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=A.device, dtype=A.dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=B.device, dtype=B.dtype)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
        self.dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling[name], self.scale[name] = alpha / r, 1.0
        self.train(self.training)  # new modules start in training mode: follow the layer's

    def delta(self, name: str) -> torch.Tensor:
        """The adapter as a full (out, in) matrix: s * alpha / r * B A, in fp32."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (B @ A) * (self.scale[name] * self.scaling[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        for name, A in self.lora_A.items():
            if name in self.fused or self.scale[name] == 0:
                continue
            down = A(self.dropout[name](x.to(A.weight.dtype)))  # (..., r)
            y = y + (self.lora_B[name](down) * (self.scale[name] * self.scaling[name])).to(y.dtype)
        return y


def target_names(model: nn.Module, targets) -> list[str]:
    """The Linear layers of the transformer blocks that `targets` (a preset name or suffixes) selects."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(
                f"targets must be one of {sorted(TARGET_PRESETS)} or a list of module names, got {targets!r}"
            )
        preset, targets = targets, TARGET_PRESETS[targets]
    else:
        preset = None
    names = []
    for name, module in model.named_modules():
        if (
            not isinstance(module, nn.Linear)
            or not name.startswith("transformer_blocks.")
            or ".lora_" in name
        ):
            continue  # (an adapter's own A and B are Linears too)
        if preset in ("all-linear", "all-linear-no-mod"):
            if preset == "all-linear" or "_mod." not in name:
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"targets {targets!r} select no Linear layer of the transformer blocks")
    return names


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    """Replace the Linear `name` by a LoRALinear sharing its weights (once; later calls reuse it)."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{name} is a {type(module).__name__}, not a Linear layer: LoRA applies to Linear layers"
        )
    wrapped = LoRALinear(module).train(module.training)  # a new Module starts in training mode
    _replace(model, name, wrapped)
    return wrapped


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` is (an attribute, or an item of a Sequential)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({a for layer in lora_layers(model).values() for a in layer.lora_A})


def add_adapter(
    model: nn.Module,
    name: str,
    targets="diffusers",
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """A new, trainable adapter for training: A normal with standard deviation 1/r (PEFT's "gaussian"),
    B = 0, so the model starts unchanged. Returns the names of the layers it was added to."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if alpha is not None:
        check_alpha(alpha, "alpha")
    check_not_fp8(model)
    check_adapter_name(model, name)
    names = target_names(model, targets)
    for layer_name in names:
        layer = _wrap(model, layer_name)
        w = layer.weight
        A = torch.randn(rank, layer.in_features, generator=generator).to(w.device) / rank  # fp32: trainable
        layer.add(
            name,
            A,
            torch.zeros(layer.out_features, rank, device=w.device),
            float(rank if alpha is None else alpha),
            dropout,
        )
    return names


def load_adapter(model: nn.Module, adapters: dict, name: str, scale: float = 1.0) -> None:
    """Put an adapter read from a file ({module: (A, B, alpha)}, see read_lora) into the model. Every
    module and shape is checked first, so a failure changes nothing."""
    check_scale(scale, "scale")
    check_not_fp8(model)
    check_adapter_name(model, name)
    check_fits(model, adapters)
    for module, (A, B, alpha) in adapters.items():
        layer = _wrap(model, module)
        layer.add(
            name,
            A.to(layer.weight.device, layer.weight.dtype),
            B.to(layer.weight.device, layer.weight.dtype),
            alpha,
        )
        layer.scale[name] = float(scale)


def check_fits(model: nn.Module, adapters: dict) -> None:
    """Every adapted module exists in the model as a Linear of the matching shape (a meta model will do)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for module, (A, B, _) in adapters.items():
        layer = linears.get(module)
        if layer is None:
            raise weights.CheckpointError(f"the LoRA adapts {module!r}, which the transformer does not have")
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features or A.shape[0] != B.shape[1]:
            raise weights.CheckpointError(
                f"the LoRA for {module} has A {list(A.shape)} and B {list(B.shape)}, but the layer is "
                f"{layer.out_features} x {layer.in_features}: it was made for a model of another width"
            )


def check_not_fp8(model: nn.Module) -> None:
    """Adapters go on bf16 weights: on fp8 ones (fp8.FP8Linear) they could be neither fused (the sum
    would be re-rounded to 3 mantissa bits) nor run beside them here. Each layer is asked the dtype of its
    weight, so this file needs nothing from fp8.py."""
    if any(
        getattr(m, "weight", None) is not None and m.weight.dtype in weights.FP8_DTYPES
        for m in model.modules()
    ):
        raise ValueError(
            "this transformer holds fp8 weights, and LoRA adapters need the bf16 ones: load the bf16 "
            "folder (weights_convert.py SRC DST --dtype bf16 makes one from an fp8 checkpoint), or "
            "merge the LoRA into the fp8 weights once with weights_convert.py SRC DST "
            "--merge-lora FILE[:SCALE] (the fp8 layers it changes are re-quantised)"
        )


def check_adapter_name(model: nn.Module, name) -> None:
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"adapter_name {name!r} cannot name an adapter (it must be a non-empty name without '.', "
            "not a torch Module attribute such as 'train'); choose another"
        )
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already loaded; choose another adapter_name")


def parse_file_and_scale(text: str) -> tuple[Path, float]:
    """The command lines' FILE or FILE:SCALE (SCALE as check_scale allows; a ':' inside the path is kept)."""
    path, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        path, value = text, 1.0
    if not path:
        raise ValueError(f"{text!r}: expected FILE or FILE:SCALE with a finite SCALE")
    check_scale(value, f"{text!r}: the SCALE of FILE:SCALE")
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such LoRA file")
    return Path(path), value


# A user's LoRA weight (scale) multiplies the adapter's update. Trainers and UIs use about -2..2, and a
# weight of 10 already burns the picture; |scale| <= 100 leaves room for any experiment and still catches
# a typo such as 1e30 or a lost decimal point, which would give a black (NaN) picture and exit code 0.
MAX_SCALE = 100.0


def check_scale(scale, what: str) -> None:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or abs(scale) > MAX_SCALE
    ):
        raise ValueError(
            f"{what} must be a finite number between -{MAX_SCALE:g} and {MAX_SCALE:g} (1 applies the LoRA "
            f"as trained, 0 switches it off), got {scale!r}"
        )


def check_alpha(alpha, where: str) -> float:
    """An alpha (file or header) as a float: a finite number > 0. alpha / r scales the update, so a NaN,
    Inf or 0 would blank the picture and a negative one would invert the LoRA, with no error."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise weights.CheckpointError(f"{where} is {alpha!r}; an alpha is a finite number > 0")
    return float(alpha)


def set_adapters(model: nn.Module, names, scales=None) -> None:
    """Use these adapters with these weights (1.0 each by default); every other adapter is switched off."""
    names = [names] if isinstance(names, str) else list(names)
    scales = (
        [1.0] * len(names)
        if scales is None
        else ([scales] * len(names) if isinstance(scales, (int, float)) else list(scales))
    )
    unknown = sorted(set(names) - set(adapter_names(model)))
    if unknown or len(scales) != len(names):
        raise ValueError(
            f"adapters {unknown} are not loaded (loaded: {adapter_names(model)})"
            if unknown
            else f"{len(names)} adapter names but {len(scales)} weights"
        )
    for s in scales:
        check_scale(s, "adapter weight")
    if any(layer.fused for layer in lora_layers(model).values()):
        raise ValueError("unfuse_lora() first: the adapters are fused into the weights")
    for layer in lora_layers(model).values():
        for a in layer.lora_A:
            layer.scale[a] = float(scales[names.index(a)]) if a in names else 0.0


def fuse(model: nn.Module) -> None:
    """Add every active adapter into its layer's weight (in the weight's dtype). The weight before is
    kept on the CPU, so that unfuse restores it exactly: host memory for every adapted layer (for an
    all-linear LoRA on the full bf16 transformer, about 40 GB; unload after fusing frees it)."""
    for layer in lora_layers(model).values():
        active = [a for a in layer.lora_A if layer.scale[a] != 0 and a not in layer.fused]
        if not active:
            continue
        if layer.weight_before_fusing is None:
            layer.weight_before_fusing = layer.weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            delta = sum(layer.delta(a) for a in active)
            layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
        layer.fused.update(active)


def unfuse(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer.weight_before_fusing is not None:
            with torch.no_grad():
                layer.weight.copy_(layer.weight_before_fusing)
            layer.weight_before_fusing = None
        layer.fused.clear()


def unload(model: nn.Module) -> None:
    """Remove every adapter and give each layer back its plain Linear. A fused adapter stays in the
    weight, as in diffusers (fuse, unload, save: a model with the LoRA baked in); unfuse first to
    get the base model back."""
    for name, layer in lora_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        _replace(model, name, plain.train(layer.training))


def trainable_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The LoRA parameters (of adapter `name`, or all), by their names in the model."""
    return {
        n: p
        for n, p in model.named_parameters()
        if (".lora_A." in n or ".lora_B." in n) and (name is None or n.endswith(f".{name}.weight"))
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

ROLE_SUFFIXES = {  # key ending -> which matrix
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_A.default.weight": "A",
    ".lora_B.default.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}
OTHER_COMPONENTS = ("lora_te", "text_encoder.", "te.", "lora_te1_", "lora_te2_", "conditioner.", "vae.")


def read_lora(path, model: nn.Module) -> tuple[dict, str]:
    """A LoRA file -> ({module: (A (r, in), B (out, r), alpha)}, the format's name), checked against
    the model's Linear layers. Safetensors only."""
    path = Path(path)
    check_not_fp8(model)  # before reading: its layers are not nn.Linear, the file would seem foreign
    header = weights.SafetensorsFile(path)  # a truncated or corrupt file fails here
    text = header.metadata.get("lora_adapter_metadata")
    metadata = weights.parse_json(text, f"{path}: lora_adapter_metadata in the header") if text else {}
    if not isinstance(metadata, dict):
        raise weights.CheckpointError(
            f"{path}: lora_adapter_metadata in the header is a JSON {type(metadata).__name__}, not the "
            'object of PEFT settings ({"transformer.r": ..., ...}) it should be; the file is damaged'
        )
    with open(path, "rb") as f:
        tensors = {k: header.read(k, f) for k in header.keys()}
    return parse_lora(tensors, metadata, model, str(path))


def parse_lora(tensors: dict, metadata: dict, model: nn.Module, source: str = "the LoRA") -> tuple[dict, str]:
    check_not_fp8(model)
    keys = list(tensors)
    if not keys:
        raise weights.CheckpointError(f"{source} holds no tensors")
    foreign = [k for k in keys if k.startswith(OTHER_COMPONENTS)]
    if foreign:
        raise weights.CheckpointError(
            f"{source} adapts the text encoder or another component (e.g. {foreign[0]!r}); "
            "only LoRAs on the transformer are supported, and nothing was applied"
        )
    prefix, fmt = "", "DiffSynth / Lightning (bare module names)"
    for p, name in (
        ("transformer.", "diffusers / PEFT"),
        ("diffusion_model.", "ComfyUI / ai-toolkit"),
        ("lora_unet_", "kohya / musubi-tuner"),
    ):
        if any(k.startswith(p) for k in keys):
            prefix, fmt = p, name
            break
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    flat = {n.replace(".", "_"): n for n in linears}  # kohya names: every "." became "_"

    parts: dict[str, dict] = {}
    for key in keys:
        suffix = next((s for s in ROLE_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(prefix) or suffix is None:
            raise weights.CheckpointError(
                f"{source}: tensor {key!r} is not part of a {fmt} LoRA for the "
                "transformer; nothing was applied"
            )
        module = key[len(prefix) : -len(suffix)]
        if prefix == "lora_unet_":
            module = flat.get(module, module)
        parts.setdefault(module, {})[ROLE_SUFFIXES[suffix]] = tensors[key]

    unknown = sorted(m for m in parts if m not in linears)
    if unknown:
        hint = " It is a LoRA for another model." if len(unknown) == len(parts) else ""
        raise weights.CheckpointError(
            f"{source} adapts {len(unknown)} module(s) the Qwen-Image transformer does not "
            f"have, e.g. {unknown[:3]}.{hint} Nothing was applied"
        )
    adapters = {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise weights.CheckpointError(
                f"{source}: {module} has no {'down (A)' if 'A' not in p else 'up (B)'} "
                "matrix; the file is incomplete"
            )
        for role in ("A", "B"):  # an integer or NaN matrix would be applied as numbers: a black picture
            t = p[role]
            if not t.is_floating_point():
                raise weights.CheckpointError(
                    f"{source}: the {role} matrix of {module} is {str(t.dtype)[6:]}; LoRA matrices are "
                    "floating point (the file is damaged or not a LoRA)"
                )
            if not torch.isfinite(t).all():
                raise weights.CheckpointError(
                    f"{source}: the {role} matrix of {module} holds NaN or Inf (a diverged training?); "
                    "nothing was applied"
                )
        A, B = p["A"].float(), p["B"].float()
        if A.ndim != 2 or B.ndim != 2:
            raise weights.CheckpointError(
                f"{source}: {module} holds {A.ndim}-D/{B.ndim}-D matrices; only plain "
                "(Linear) LoRA is supported, not LoCon/LoKr"
            )
        adapters[module] = (A, B, _alpha(module, A.shape[0], p.get("alpha"), metadata, source))
    return adapters, fmt


def _alpha(module: str, rank: int, tensor, metadata: dict, source: str = "the LoRA") -> float:
    """The file's .alpha, else PEFT's alpha_pattern / lora_alpha from the header, else the rank.
    rsLoRA (use_rslora in the header) scales by alpha / sqrt(r): returned as the alpha that gives that
    scale in alpha / r. Each checked with check_alpha."""
    if tensor is not None:
        if tensor.numel() != 1 or tensor.dtype == torch.bool:
            raise weights.CheckpointError(
                f"{source}: {module}.alpha is a {str(tensor.dtype)[6:]} tensor of shape "
                f"{list(tensor.shape)}; an alpha is one number"
            )
        return check_alpha(tensor.double().item(), f"{source}: {module}.alpha")
    header = f"{source}: the header's transformer.lora_alpha"
    alpha = check_alpha(metadata.get("transformer.lora_alpha", rank), header)
    patterns = metadata.get("transformer.alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise weights.CheckpointError(
            f"{source}: the header's transformer.alpha_pattern is {patterns!r}; PEFT writes an object "
            "{module pattern: alpha}"
        )
    for pattern, value in patterns.items():
        try:
            hit = re.fullmatch(rf"(.*\.)?({pattern})", module)  # PEFT's rule for its patterns
        except re.error as e:
            raise weights.CheckpointError(
                f"{source}: the header's transformer.alpha_pattern {pattern!r} is not a regular expression ({e})"
            ) from None
        if hit:
            alpha = check_alpha(value, f"{source}: the header's transformer.alpha_pattern {pattern!r}")
            break
    return alpha * math.sqrt(rank) if metadata.get("transformer.use_rslora") else alpha


def adapter_state(model: nn.Module, name: str) -> dict:
    """An adapter of the model in the internal form {module: (A, B, alpha)}, e.g. to save it."""
    out = {}
    for module, layer in lora_layers(model).items():
        if name in layer.lora_A:
            A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
            out[module] = (A, B, layer.scaling[name] * A.shape[0])
    if not out:
        raise ValueError(f"no adapter named {name!r} (loaded: {adapter_names(model)})")
    return out


def write_lora(path, adapters: dict, format: str = "diffusers") -> None:
    """Save {module: (A, B, alpha)} atomically: "diffusers" (transformer.<m>.lora_A/B.weight, the PEFT
    config in the header, as diffusers' save_lora_weights writes and load_lora_weights reads) or
    "comfyui" (diffusion_model.<m>.lora_A/B.weight with .alpha tensors).

    The diffusers format keeps alpha only in the header, which ComfyUI, kohya and musubi ignore; so
    alpha / r is folded into B there (and lora_alpha = r), and every tool applies the same update."""
    if format not in ("diffusers", "comfyui"):
        raise ValueError(f"format must be 'diffusers' or 'comfyui', got {format!r}")
    ranks = {A.shape[0] for A, _, _ in adapters.values()}
    tensors, metadata = {}, {}
    for module, (A, B, alpha) in sorted(adapters.items()):
        if format == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"] = A
            tensors[f"transformer.{module}.lora_B.weight"] = B * (alpha / A.shape[0])
        else:
            tensors[f"diffusion_model.{module}.lora_A.weight"] = A
            tensors[f"diffusion_model.{module}.lora_B.weight"] = B
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    if format == "diffusers":
        if len(ranks) != 1:
            raise ValueError(
                "the diffusers format records one rank; this adapter mixes ranks "
                "(save it as format='comfyui', which needs none)"
            )
        rank = ranks.pop()
        metadata = {
            "lora_adapter_metadata": json.dumps(
                {
                    "transformer.r": rank,
                    "transformer.lora_alpha": rank,
                    "transformer.target_modules": sorted(adapters),
                    "transformer.init_lora_weights": "gaussian",
                    "transformer.use_dora": False,
                    "transformer.bias": "none",
                },
                indent=2,
                sort_keys=True,
            )
        }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    writing.write_safetensors(
        path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], tensors.values(), metadata=metadata
    )

"""fp8 weights: the MMDiT's block Linear layers kept in 8 bits on the GPU, computed in bf16.

float8_e4m3fn ("e4m3", "fn": finite, no infinities) spends 1 sign bit, 4 exponent bits (bias 7)
and 3 mantissa bits: 8 numbers per power of two, the largest 448, the smallest normal 2^-6 (and
subnormals down to 2^-9). Rounding to the nearest of them costs at most 2^-4 (6.25 %) of a
number's size, about 2 % on average. Half the bytes of bf16: the 20 B transformer takes ~20.5 GB.

Per-tensor scaling uses that range for every layer: each weight matrix W (out, in) gets one fp32
number s, and the file stores q = fp8(W / s) with s = max|W| / 448, so the largest weight lands on
448. Reading it back (the reference formula; s = 1 for files without scales):

    W ~ (q.to(float32) * s).to(compute dtype)        s: a 0-dim float32 tensor

This is what ComfyUI computes on NVIDIA GPUs: comfy-kitchen's CUDA kernel converts each fp8 value
to float, multiplies by the fp32 scale and rounds once to bf16
(https://github.com/Comfy-Org/comfy-kitchen, comfy_kitchen/backends/cuda/ops/per_tensor_quantize.cu,
dequantize_fp8_tensor_kernel). Its eager (CPU) backend and ComfyUI's older comfy/ops.py
(`scaled_fp8_ops`) write `q.to(dtype) * s.to(dtype)`: the scale is rounded to bf16 first, which moves
a whole layer by up to 2^-9 of its size. We compute in fp32 as the CUDA kernel does, on every device,
and spell it out: PyTorch's own `q.to(bf16) * s` (0-dim fp32 s) multiplies in fp32 on the CPU but
rounds s to bf16 first on CUDA (35 % of the values differ; H100, torch 2.11).

ComfyUI's files (comfy/utils.py `convert_old_quants`, comfy/model_detection.py in
https://github.com/Comfy-Org/ComfyUI):
* plain fp8 (`qwen_image_fp8_e4m3fn.safetensors`): some weights simply stored as F8_E4M3, no scales;
  ComfyUI upcasts them per layer (s = 1).
* scaled fp8: `<layer>.scale_weight` (F32, shape []) beside each fp8 `<layer>.weight`, optionally
  `<layer>.scale_input` (the activation scale, used only when the matrix product itself runs in fp8,
  with torch._scaled_mm; ComfyUI drops it when it is 1.0), and one marker tensor `scaled_fp8` at the
  model's key prefix: its dtype names the weights' fp8 type (F32 is the legacy spelling of e4m3fn),
  its contents are unused; 2 elements mean "dequantise and multiply in full precision", any other
  count allows fp8 matrix products. Newer ComfyUI renames these to `weight_scale` / `input_scale`
  with per-layer `comfy_quant` configs; weights_convert.py reads the older layout.
Which layers the official ComfyUI Qwen-Image fp8 file keeps in fp8 we could not read from source, so
loading takes any Linear weight stored in fp8, with or without a scale.

Here: the Linear layers inside `transformer_blocks` (99.8 % of the 20 B parameters: attention
projections, MLPs and the AdaLN `*_mod` layers) become FP8Linear: fp8 weight + fp32 scale, upcast
per call (~75 MB of bf16 at a time). Everything else stays in the compute dtype: img_in, txt_in,
the timestep MLP, norm_out and proj_out (0.2 % of the weights, the layers that touch the model's
inputs and outputs, and img_in's dtype is the model's compute dtype), every norm and bias. An fp8
weight found outside the blocks is dequantised once at load, with the same formula, so the
numbers are those of an FP8Linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import mmdit, weights

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight * fp32 scale, in fp32, rounded once to `dtype` (the reference formula above)."""
    return (weight.to(torch.float32) * scale).to(dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (q, s): s = max|W| / 448 in fp32 (1 for an all-zero W), q = fp8(W / s) by a plain
    round-to-nearest cast. On the meta device only the shapes and dtypes."""
    if weight.is_meta:
        return torch.empty_like(weight, dtype=FP8), torch.empty((), device="meta")
    w = weight.detach().to(torch.float32)
    amax = w.abs().max()
    if not torch.isfinite(amax):
        raise ValueError(f"cannot quantise a weight holding NaN or Inf (shape {list(weight.shape)})")
    scale = amax / FP8_MAX if amax > 0 else torch.ones((), device=w.device)
    return (w / scale).to(FP8), scale


class FP8Linear(nn.Module):
    """A Linear layer whose weight is stored in fp8 with one fp32 scale; y = x W^T + b with W
    dequantised per call to x's dtype. Not trainable (the weight is not a gradient target).

    `scale_weight` is ComfyUI's name, so the state dict's keys are the file's. A layer read from a
    file without scales has scale 1.0, not saved (persistent=False): its keys are still the file's."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = FP8,
        scaled: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=weight_dtype), requires_grad=False
        )
        self.register_buffer("scale_weight", torch.ones((), device=device), persistent=scaled)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise a Linear per tensor; the bias (in the compute dtype) is shared, not copied."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, device=w.device)
        q, scale = quantize_weight(w)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.scale_weight = scale
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.scale_weight, x.dtype), self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .float() cast every floating tensor, fp8 included: that would undo
        # the saving (and round the fp32 scale). Here they change only the bias; .to(device) moves all.
        weight, scale = self.weight.detach(), self.scale_weight  # (nn.Module swaps a parameter's .data)
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
        if self.scale_weight.dtype != scale.dtype:
            self.scale_weight = scale.to(self.scale_weight.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={str(self.weight.dtype)[6:]}"
        )


SCALE = ".scale_weight"


def check_scale(
    where, name: str, dtype: torch.dtype, shape: tuple, weight_dtype: torch.dtype | None, is_linear: bool
) -> None:
    """A `<layer>.scale_weight` (of this dtype and shape) must sit beside the fp8 weight of a Linear
    layer and be one floating-point number; else a CheckpointError that names it."""
    layer = name[: -len(SCALE)]
    if not is_linear:
        raise weights.CheckpointError(
            f"{where}: {name!r} scales {layer!r}, which is not a Linear layer of the transformer"
        )
    if weight_dtype not in weights.FP8_DTYPES:
        held = "absent" if weight_dtype is None else f"stored in {str(weight_dtype)[6:]}"
        raise weights.CheckpointError(
            f"{where}: {name!r} scales the weight {layer}.weight, which is {held}; a "
            "scale belongs beside an fp8 weight"
        )
    if tuple(shape) not in ((), (1,)) or not dtype.is_floating_point:
        raise weights.CheckpointError(
            f"{where}: {name!r} is {str(dtype)[6:]} {list(shape)}; a per-tensor scale "
            "is one floating-point number (shape [] or [1])"
        )


def read_scale(where, name: str, stored: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """A stored scale as the 0-dim fp32 tensor the formula takes (a (1,)-shaped one would promote
    the product to fp32)."""
    scale = stored.to(torch.float32).reshape(())
    if check_finite and not (torch.isfinite(scale) and scale > 0):
        raise weights.CheckpointError(f"{where}: {name!r} is {scale.item()}; a scale is a positive number")
    return scale


def block_linears(model: nn.Module) -> list[str]:
    """The names of the Linear layers inside transformer_blocks: the ones kept in fp8."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, FP8Linear)) and name.startswith("transformer_blocks.")
    ]


def quantize(model: nn.Module) -> nn.Module:
    """Replace every Linear inside `transformer_blocks` with an FP8Linear (per-tensor scale
    max|W| / 448, round to nearest), in place, on whatever device the model is (meta included).
    The other layers keep their dtype (see the module docstring). Returns the model."""
    for name in block_linears(model):
        module = model.get_submodule(name)
        if isinstance(module, FP8Linear):
            continue
        if type(module) is not nn.Linear:
            raise ValueError(
                f"{name} is a {type(module).__name__}: only plain Linear layers are quantised "
                "(fuse and unload LoRA adapters first)"
            )
        model.set_submodule(name, FP8Linear.from_linear(module))
    return model


# ---------------------------------------------------------------------------------------------
# Loading an official-layout transformer/ folder that holds fp8 weights
# ---------------------------------------------------------------------------------------------


def is_fp8_folder(path: str | os.PathLike) -> bool:
    """Does the transformer folder hold fp8 tensors? Reads only the safetensors headers."""
    files = weights.weight_files(path, mmdit.WEIGHTS_STEM)
    headers = {p: weights.SafetensorsFile(p) for p in set(files.values())}
    return any(headers[p].entries.get(n, (None,))[0] in weights.FP8_DTYPES for n, p in files.items())


def load_transformer(
    path: str | os.PathLike, device=None, dtype: torch.dtype = torch.bfloat16, check_finite: bool = True
) -> mmdit.MMDiT:
    """An MMDiT from a transformer/ folder with fp8 weights (with or without `scale_weight`s; plain
    ones load too): block Linears whose weight is fp8 become FP8Linear, every other tensor is read
    into `dtype`. The same strict checks as mmdit.load, plus: every scale belongs to an fp8 Linear
    weight and is a single number."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype is the compute dtype, one of {COMPUTE_DTYPES}, got {dtype}")
    device = torch.device(device or "cpu")
    config = mmdit.config_from_folder(path)
    files = weights.weight_files(path, mmdit.WEIGHTS_STEM)
    headers = {p: weights.SafetensorsFile(p) for p in sorted(set(files.values()))}
    entry = {n: headers[p].entries.get(n) for n, p in files.items()}  # None: load_weights names it
    linears = {
        name: m
        for name, m in weights.build_on_meta(lambda: mmdit.MMDiT(config)).named_modules()
        if isinstance(m, nn.Linear)
    }

    fp8_weights = {
        n[: -len(".weight")]: e[0]
        for n, e in entry.items()
        if n.endswith(".weight") and e is not None and e[0] in weights.FP8_DTYPES
    }
    scales = {}
    for name, e in entry.items():
        if name.endswith(SCALE) and e is not None:
            layer = name[: -len(SCALE)]
            weight = entry.get(layer + ".weight")
            check_scale(path, name, e[0], e[1], weight and weight[0], layer in linears)
            scales[layer] = read_scale(path, name, headers[files[name]].read(name), check_finite)

    in_blocks = {
        layer for layer in fp8_weights if layer in linears and layer.startswith("transformer_blocks.")
    }

    def build():
        model = mmdit.MMDiT(config)
        for layer in in_blocks:
            lin = linears[layer]
            model.set_submodule(
                layer,
                FP8Linear(
                    lin.in_features,
                    lin.out_features,
                    bias=lin.bias is not None,
                    weight_dtype=fp8_weights[layer],
                    scaled=layer in scales,
                ),
            )
        return model

    def rename(name):  # the scales of layers dequantised at load were read above
        layer, _, leaf = name.rpartition(".")
        return None if leaf == "scale_weight" and layer not in in_blocks else name

    def convert(name, stored):
        layer, _, leaf = name.rpartition(".")
        if layer in in_blocks and leaf == "weight":
            return stored.to(device)  # stays fp8
        if layer in in_blocks and leaf == "scale_weight":
            return stored.to(device, torch.float32).reshape(())
        if leaf == "weight" and layer in fp8_weights and layer in linears:  # outside the blocks
            return dequantize(stored.to(device), scales.get(layer, torch.ones(())).to(device), dtype)
        return stored.to(device, dtype) if stored.is_floating_point() else stored.to(device)

    model = weights.load_weights(
        build,
        path,
        mmdit.WEIGHTS_STEM,
        device=device,
        dtype=dtype,
        rename=rename,
        block_counts={"transformer_blocks": ("num_layers", config.num_layers)},
        check_finite=check_finite,
        convert=convert,
    )
    for layer in in_blocks - set(scales):  # unscaled fp8: the scale is 1, not in the file
        model.get_submodule(layer).scale_weight = torch.ones((), device=device)
    return model

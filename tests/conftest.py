"""Shared test helpers: reference models with random weights, written in the official folder layout.

Every parity test builds the reference (diffusers / transformers) model, randomises *all* of its
tensors (norm weights and biases too, so a forgotten one changes the output), saves it with
`save_pretrained` (sharded, like the official checkpoints) and loads that folder with our code.
"""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with random values: weights ~ N(0, scale^2)-ish, norm weights ~ 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in name or "gamma" in name):
                p.copy_(1.0 + 0.2 * noise)  # norm weight: around 1, never exactly 1
            elif p.ndim == 1:
                p.copy_(scale * noise)  # biases
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)  # keeps activations O(1) through the depth
    return module


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference's scale (max |ref|)."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def squares(folder: Path, size=(64, 64), captions=True) -> Path:
    """Four pictures: a coloured square on a light background, captioned with its colour."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        im = Image.new("RGB", size, (240, 240, 240))
        ImageDraw.Draw(im).rectangle(
            [size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=rgb
        )
        im.save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.txt").write_text(f"a {name} square\n")
    return folder


def checkpoint_state(checkpoint: Path, tmp_path: Path) -> tuple[dict, dict]:
    """A full fine-tuning checkpoint's weights and AdamW state ({"<name>.<exp_avg|exp_avg_sq|step>": tensor}),
    from either format: one process's (transformer/ and training_state.safetensors) or a sharded one (dcp/,
    read whole by torch.distributed.checkpoint's converter)."""
    if (checkpoint / "dcp").is_dir():
        converted = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
        dcp_to_torch_save(checkpoint / "dcp", converted)
        saved = torch.load(converted)
        moments = {f"{n}.{k}": v for n, s in saved["optim"]["state"].items() for k, v in s.items()}
        return saved["model"], moments
    tensors = load_file(checkpoint / "training_state.safetensors")
    moments = {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")}
    return load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"), moments

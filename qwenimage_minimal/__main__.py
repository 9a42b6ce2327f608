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
import sys
from pathlib import Path

import torch

from . import (
    cli_options,
    demo,
    distributed,
    fp8,
    images,
    lora,
    mmdit,
    pipeline,
    scheduler,
    weights,
)
from .cli_options import (
    OFFICIAL_DEFAULTS,
    check_sampling_options,
    fill_sampling_defaults,
    resolve_device,
    resolve_dtype,
)

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


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
    d.add_argument(
        "--cfg",
        type=float,
        help="true CFG scale; default: the model folder's (nano 3, nano Edit 2: measured best), else 4",
    )
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
        {"demo": demo.demo, "generate": generate, "edit": edit}[a.command](a)
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

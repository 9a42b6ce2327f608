"""The command line's option groups that become pipeline arguments, checked before any model loads: the image
inputs of `generate` (img2img, inpainting, ControlNet) and `edit --mask`'s strength, and the parallel layout
(`--tensor-parallel`, `--cfg-parallel`, under torchrun). __main__.py calls them; each raises SystemExit with a
one-sentence error naming the flag."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from . import controlnet, images, mmdit, pipeline, scheduler


def parallel_options(args) -> dict:
    """--tensor-parallel and --cfg-parallel (under torchrun) as from_pretrained's tensor_parallel and
    cfg_parallel; the world size and the head count are checked there (parallel.py)."""
    if args.tensor_parallel < 1:
        raise SystemExit(f"error: --tensor-parallel must be an integer >= 1, got {args.tensor_parallel}")
    if args.cfg_parallel and not args.cfg > 1:
        raise SystemExit(
            f"error: --cfg-parallel runs the two CFG passes on two processes: it needs --cfg > 1, got {args.cfg:g}"
        )
    if args.lora and args.tensor_parallel > 1:
        raise SystemExit(
            "error: --lora cannot be added to a tensor-parallel transformer (--tensor-parallel) yet"
        )
    return dict(tensor_parallel=args.tensor_parallel, cfg_parallel=args.cfg_parallel)


def main_process() -> bool:
    """Rank 0 under torchrun (the one that writes the picture), or the only process."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def check_strength_option(args) -> float:
    """--strength (default 0.6, diffusers'): in (0, 1], and at least one of the --steps left to run."""
    strength = 0.6 if args.strength is None else args.strength
    pipeline.check_strength(strength, "--strength")
    pipeline.strength_schedule(torch.zeros(args.steps + 1), strength, "--strength")
    return strength


def generate_inputs(args, root: Path):
    """--image/--strength/--mask (img2img, inpainting), --control-image/--controlnet/--control-scale (ControlNet;
    with --mask, ControlNet inpainting), checked and read before any model loads.
    -> (pipeline class, the call's extra arguments, from_pretrained's extra arguments)."""
    image, control, net = (getattr(args, k) is not None for k in ("image", "control_image", "controlnet"))
    for wrong, message in [
        ((control or net) and image, "--image and --control-image exclude each other"),
        (control != net, "--control-image FILE and --controlnet DIR go together"),
        (args.strength is not None and not image, "--strength needs --image (the picture to start from)"),
        (args.mask is not None and not (image or control), "--mask needs --image or --control-image"),
        (args.control_scale is not None and not net, "--control-scale needs --controlnet"),
    ]:
        if wrong:
            raise SystemExit(f"error: {message}")
    if net:
        config = controlnet.config_from_folder(args.controlnet)
        transformer = mmdit.config_from_folder(root / "transformer")
        controlnet.check_fits(config, transformer, f"--controlnet {args.controlnet}")
        scale = 1.0 if args.control_scale is None else args.control_scale
        if not math.isfinite(scale):
            raise SystemExit(f"error: --control-scale {scale}: must be a finite number")
        picture = images.open_image(args.control_image, name="--control-image")
        inputs = dict(control_image=picture, controlnet_conditioning_scale=scale)
        if args.mask is None:
            return pipeline.QwenImageControlNetPipeline, inputs, dict(controlnet=args.controlnet)
        if config.extra_condition_channels != 4:
            raise SystemExit(f"error: --mask needs an inpainting ControlNet; {args.controlnet} is not")
        mask = images.open_image(args.mask, name="--mask")
        inputs["control_mask"] = pipeline.load_mask(mask, picture, "--mask", "--control-image")
        return pipeline.QwenImageControlNetInpaintPipeline, inputs, dict(controlnet=args.controlnet)
    if not image:
        return pipeline.QwenImagePipeline, {}, {}
    picture = images.open_image(args.image, name="--image")
    inputs = dict(image=picture, strength=check_strength_option(args))
    if args.mask is None:
        return pipeline.QwenImageImg2ImgPipeline, inputs, {}
    mask = images.open_image(args.mask, name="--mask")
    inputs["mask_image"] = pipeline.load_mask(mask, picture, "--mask", "--image")
    return pipeline.QwenImageInpaintPipeline, inputs, {}


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

"""The command line's option groups that become pipeline arguments, checked before any model loads: the image
inputs of `generate` (img2img, inpainting, ControlNet) and `edit --mask`'s strength, and the parallel layout
(`--tensor-parallel`, `--cfg-parallel`, under torchrun). __main__.py calls them; each raises SystemExit with a
one-sentence error naming the flag."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import controlnet, images, mmdit, pipeline


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

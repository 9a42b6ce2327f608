"""ControlNet: QwenImageControlNetPipeline and QwenImageControlNetInpaintPipeline.

    control image ─ resized to height x width ─ VAE encode (a posterior draw) ─ normalise, pack ─> control tokens
    each step i of N, for each (ControlNet, control tokens, scale, window [start, end]):
        inside its window (i / N >= start and (i + 1) / N <= end):
            residuals += ControlNet(x, control tokens, prompt, sigma) * scale      (controlnet.py)
    MMDiT(x, prompt, sigma, controlnet_block_samples=residuals); both CFG passes take the same residuals

Several at once, as diffusers' QwenImageMultiControlNetModel (lists): one ControlNet (a "union" model) with a
list of control images, run once per image; or a list of ControlNets, one control image each. Their residuals
add up; controlnet_conditioning_scale and control_guidance_start / end are then one number or one per image.

Inpainting (QwenImageControlNetInpaintPipeline, for an inpainting ControlNet, extra_condition_channels 4): the
control tokens are the control image with its masked pixels set to black (-1), encoded, beside the mask turned
round (1 = keep) at latent size: (16 + 1) channels x 2x2 = 68. diffusers draws that posterior with
`latent_dist.sample()` and no generator (outside the caller's seed); ours takes the posterior mean, so a seed
decides the result. The tests compare with diffusers' draw replaced by the mean.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import images, mmdit
from ..controlnet import QwenImageControlNet, check_fits
from ..controlnet import load as load_controlnet
from .img2img import load_image
from .inpaint import load_mask
from .loading import check_model_folder
from .text_to_image import PipelineOutput, QwenImagePipeline, check_generators


def load_controlnets(controlnet, device=None, dtype=None, check_finite: bool = True) -> list:
    """controlnet= as from_pretrained takes it: a folder (diffusers' layout), a loaded QwenImageControlNet, or
    a list of either -> a list of models."""
    if controlnet is None:
        raise ValueError(
            "controlnet is required: a ControlNet folder (config.json + safetensors), a loaded "
            "QwenImageControlNet, or a list of them"
        )
    given = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not given:
        raise ValueError("controlnet is an empty list: pass at least one ControlNet (a folder or a model)")
    nets = []
    for i, net in enumerate(given):
        if isinstance(net, (str, Path)):
            net = load_controlnet(net, device=device, dtype=dtype, check_finite=check_finite)
        elif not isinstance(net, QwenImageControlNet):
            raise TypeError(
                f"controlnet[{i}] must be a ControlNet folder or a loaded QwenImageControlNet, "
                f"got {type(net).__name__}"
            )
        nets.append(net)
    if len({net.config.num_layers for net in nets}) > 1:
        raise ValueError(
            f"controlnet: these ControlNets have {[net.config.num_layers for net in nets]} blocks; several at "
            "once must have the same number (their residuals are added block by block)"
        )
    return nets


def per_image(value, count: int, name: str) -> list:
    """One number, or a list of one per control image -> a list of `count` finite numbers."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} control image(s): give one per image")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must hold finite numbers, got {v!r}")
    return values


class QwenImageControlNetPipeline(QwenImagePipeline):
    """diffusers' QwenImageControlNetPipeline: text-to-image steered by one or several ControlNets."""

    def __init__(self, *components, controlnet=None, **options):
        super().__init__(*components, **options)
        self.controlnets = []
        if controlnet is not None:
            self.set_controlnet(controlnet)

    def set_controlnet(self, controlnet) -> None:
        """Use these ControlNets (as from_pretrained's controlnet=), each checked against the transformer."""
        place = torch.device("cpu") if self.offload else self.device  # folders load as the transformer is
        nets = load_controlnets(controlnet, place, self.transformer.img_in.weight.dtype)
        for i, net in enumerate(nets):
            check_fits(
                net.config, self.transformer.config, f"controlnet[{i}]" if len(nets) > 1 else "controlnet"
            )
        self.controlnets = nets

    @classmethod
    def from_pretrained(
        cls, root, controlnet=None, device=None, dtype=None, offload: bool = False, **options
    ):
        """An official Qwen-Image folder and `controlnet`: a ControlNet folder, a loaded one, or a list. The
        ControlNets load and are checked against the transformer's config first: a misfit fails in seconds.
        Without `controlnet`, the folder's own controlnet/ (what diffusers' save_pretrained of a ControlNet
        pipeline writes) if it has one. The other options are QwenImagePipeline.from_pretrained's."""
        root = Path(root)
        check_model_folder(root, "Qwen-Image")
        if controlnet is None and (root / "controlnet" / "config.json").is_file():
            controlnet = root / "controlnet"
        place = torch.device("cpu") if offload or options.get("max_gpu_memory") is not None else device
        nets = load_controlnets(controlnet, place, dtype, options.get("check_finite", True))
        transformer = mmdit.config_from_folder(root / "transformer")
        for i, net in enumerate(nets):
            check_fits(net.config, transformer, f"controlnet[{i}]" if len(nets) > 1 else "controlnet")
        pipe = super().from_pretrained(root, device=device, dtype=dtype, offload=offload, **options)
        pipe.controlnets = nets
        return pipe

    # --- the control inputs ----------------------------------------------------------------------

    def control_units(self, count, scale, start, end, channels) -> list:
        """-> [(ControlNet, scale, start, end)], one per control image, checked: a union ControlNet serves
        every image; several ControlNets take one image each; `channels`: what the control tokens hold."""
        nets = self.controlnets
        if not nets:
            raise ValueError("this pipeline has no ControlNet: pass controlnet= to from_pretrained")
        if len(nets) not in (1, count):
            raise ValueError(
                f"control_image: {count} control image(s) for {len(nets)} ControlNets: pass one per ControlNet "
                "(or several for one union ControlNet)"
            )
        for net in nets:
            reads = net.config.in_channels + net.config.extra_condition_channels
            if reads != channels:
                fix = (
                    "this pipeline needs an inpainting ControlNet (extra_condition_channels 4)"
                    if reads < channels
                    else "an inpainting ControlNet goes with QwenImageControlNetInpaintPipeline"
                )
                raise ValueError(
                    f"controlnet: this ControlNet reads {reads} channels but the control tokens have {channels}: "
                    f"{fix}"
                )
        scales = per_image(scale, count, "controlnet_conditioning_scale")
        starts = per_image(start, count, "control_guidance_start")
        ends = per_image(end, count, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0 <= s < e <= 1:
                raise ValueError(
                    f"control_guidance_start {s} and control_guidance_end {e}: need 0 <= start < end <= 1 "
                    "(fractions of the schedule)"
                )
        return [(nets[0] if len(nets) == 1 else nets[k], scales[k], starts[k], ends[k]) for k in range(count)]

    def control_tokens(self, picture, width, height, batch, generator) -> torch.Tensor:
        """PIL control image -> resized (Lanczos) -> a posterior draw per sample -> (batch, N, C p²)."""
        pixels = images.to_tensor(images.fit(picture, width, height))  # (1, 3, H, W) in [-1, 1]
        return self.encode_pixels(pixels.expand(batch, -1, -1, -1), generator)

    def steering(self, units, tokens, prompt, img_shapes, steps):
        """sampling.denoise's `control`: each step, the residuals of the ControlNets inside their window."""

        def control(i, x, sigma):
            total = None
            for (net, scale, start, end), control_tokens in zip(units, tokens):
                if i / steps < start or (i + 1) / steps > end or scale == 0:
                    continue  # outside its window: diffusers runs it at scale 0, which adds nothing
                residuals = net(x, control_tokens, *prompt, sigma, img_shapes, scale)  # K x (B, N, dim)
                total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
            return total

        return control

    # --- the run -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas=None,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        control_image=None,
        controlnet_conditioning_scale=1.0,
        **common,
    ) -> PipelineOutput:
        """diffusers' arguments (the rest as QwenImagePipeline's: num_images_per_prompt, generator, latents,
        prompt_embeds..., output_type, callback_on_step_end, max_sequence_length, tiled_vae, progress).
        control_image: one picture (PIL, array or tensor), or a list (one per ControlNet, or several for one)."""
        if control_image is None:
            raise ValueError(
                "control_image is required: the picture (pose, edges, depth, ...) the ControlNet steers with"
            )
        given = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        pictures = [
            load_image(p, f"control_image[{k}]" if len(given) > 1 else "control_image")
            for k, p in enumerate(given)
        ]
        units = self.control_units(
            len(pictures),
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            self.transformer.config.in_channels,
        )

        def tokens(
            width, height, batch, generator
        ):  # the posterior draws come before the noise, as in diffusers
            return [self.control_tokens(p, width, height, batch, generator) for p in pictures]

        return self.sample(
            units,
            tokens,
            prompt,
            negative_prompt,
            true_cfg_scale,
            height,
            width,
            num_inference_steps,
            sigmas,
            **common,
        )

    def sample(
        self,
        units,
        make_tokens,
        prompt,
        negative_prompt,
        true_cfg_scale,
        height,
        width,
        num_inference_steps,
        sigmas,
        num_images_per_prompt: int = 1,
        generator=None,
        latents=None,
        prompt_embeds=None,
        prompt_embeds_mask=None,
        negative_prompt_embeds=None,
        negative_prompt_embeds_mask=None,
        output_type: str = "pil",
        callback_on_step_end=None,
        max_sequence_length: int = 512,
        tiled_vae: bool = False,
        progress: bool = True,
    ) -> PipelineOutput:
        """Text-to-image with the ControlNets' residuals; make_tokens(width, height, batch, generator) gives
        each unit's control tokens."""
        height, width = self.check_size(height or 1024, width or 1024)
        self.check_call(
            num_inference_steps,
            height,
            width,
            output_type,
            num_images_per_prompt,
            max_sequence_length,
            true_cfg_scale,
        )
        sigmas = self.schedule(num_inference_steps, height, width, sigmas)
        cond, uncond = self.prompt_embeddings(
            prompt,
            negative_prompt,
            true_cfg_scale,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            num_images_per_prompt,
            max_sequence_length,
        )
        batch = len(cond[0])
        check_generators(generator, batch)  # before the control images' draws
        tokens = make_tokens(width, height, batch, generator)
        latents = self.prepare_latents(latents, batch, height, width, generator)
        img_shapes = [(1, height // self.size_multiple, width // self.size_multiple)]
        control = self.steering(units, tokens, cond, img_shapes, len(sigmas) - 1)
        with contextlib.ExitStack() as stack:
            for net in {id(net): net for net, *_ in units}.values():
                stack.enter_context(self.active(net))
            latents = self.denoise(
                latents,
                cond,
                uncond,
                true_cfg_scale,
                img_shapes,
                sigmas,
                callback_on_step_end,
                progress,
                control=control,
            )
        return self.decode(latents, height, width, output_type, tiled_vae)


class QwenImageControlNetInpaintPipeline(QwenImageControlNetPipeline):
    """diffusers' QwenImageControlNetInpaintPipeline: an inpainting ControlNet (extra_condition_channels 4)
    repaints the white region of control_mask in control_image; sampling starts from pure noise."""

    def inpaint_tokens(self, picture, mask, width, height, batch) -> torch.Tensor:
        """-> (batch, N, (C + 1) p²): the masked picture's latents (posterior mean), then the kept region."""
        pixels = images.to_tensor(images.fit(picture, width, height))  # (1, 3, H, W) in [-1, 1]
        repaint = images.mask_to_tensor(images.fit(mask, width, height))  # (1, 1, H, W), 1 = repaint
        latents = self.encode_pixels(pixels.masked_fill(repaint > 0.5, -1.0), sample=False)  # (1, N, C p²)
        s, p = self.vae_scale_factor, self.transformer.config.patch_size
        keep = 1 - F.interpolate(repaint, size=(height // s, width // s))  # (1, 1, h, w)
        keep = mmdit.pack_latents(keep, p).to(latents.device, latents.dtype)  # (1, N, p²)
        # packing puts channels slowest, so [latents | mask] per pixel packs to [packed latents | packed mask]
        return torch.cat([latents, keep], dim=-1).expand(batch, -1, -1)

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas=None,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        control_image=None,
        control_mask=None,
        controlnet_conditioning_scale=1.0,
        **common,
    ) -> PipelineOutput:
        """diffusers' arguments; control_image the picture, control_mask white where it is repainted (one size)."""
        if control_image is None:
            raise ValueError("control_image is required: the picture to inpaint")
        picture = load_image(control_image, "control_image")
        mask = load_mask(control_mask, picture, "control_mask", "control_image")
        channels = (self.vae.config.z_dim + 1) * self.transformer.config.patch_size**2
        units = self.control_units(
            1, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, channels
        )

        def tokens(width, height, batch, generator):
            return [self.inpaint_tokens(picture, mask, width, height, batch)]

        return self.sample(
            units,
            tokens,
            prompt,
            negative_prompt,
            true_cfg_scale,
            height,
            width,
            num_inference_steps,
            sigmas,
            **common,
        )

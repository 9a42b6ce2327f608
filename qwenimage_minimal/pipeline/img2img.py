"""Image-to-image: QwenImageImg2ImgPipeline, text-to-image that starts part-way along the flow, from a picture.

    image ─ resized to height x width ─ VAE encode (a posterior draw, from the generator) ─ normalise, pack ─> x0
    schedule (text_to_image.py) ─ strength s skips its first int(N - N s) steps ─> sigmas from sigma_0 down
    x = sigma_0 * noise + (1 - sigma_0) * x0        where flow matching's straight path is at sigma_0
    denoise the rest of the schedule (sampling.py), decode

strength 1 starts from pure noise (the picture is ignored); a small strength changes little. The starting noise
comes from the generator after the posterior draw, as in diffusers, so the two agree number for number.
"""

from __future__ import annotations

import math

import torch

from .. import images
from .text_to_image import PipelineOutput, QwenImagePipeline


def check_strength(strength, name: str = "strength") -> None:
    if (
        not isinstance(strength, (int, float))
        or isinstance(strength, bool)
        or not math.isfinite(strength)
        or not 0 < strength <= 1
    ):
        raise ValueError(
            f"{name} must be a number in (0, 1] (1 = start from pure noise, small = stay close to the "
            f"image), got {strength!r}"
        )


def strength_schedule(sigmas: torch.Tensor, strength: float, name: str = "strength") -> torch.Tensor:
    """The schedule (N + 1,) without its first int(N - N * strength) steps (diffusers' rule), so that sampling
    starts at sigmas[skip]; an error when no step would be left."""
    steps = len(sigmas) - 1
    skip = int(max(steps - min(steps * strength, steps), 0))
    if skip >= steps:
        raise ValueError(
            f"{name} {strength!r} leaves none of the {steps} steps to run: raise it (or the number of steps)"
        )
    return sigmas[skip:]


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Flow matching's forward process: the point at `sigma` on the straight path from x0 (0) to noise (1)."""
    return sigma * noise + (1.0 - sigma) * x0


def load_image(image, name: str = "image"):
    """One input picture as PIL RGB (arrays and tensors as to_rgb reads them), checked."""
    if image is None:
        raise ValueError(f"{name} is required: the picture to start from")
    if isinstance(image, (list, tuple)):
        raise ValueError(f"{name}: pass one picture, got a list of {len(image)} (the prompts make the batch)")
    return images.to_rgb(image, name=name)


class QwenImageImg2ImgPipeline(QwenImagePipeline):
    """diffusers' QwenImageImg2ImgPipeline: the text-to-image components, a picture and a strength. Loaded
    from an official Qwen-Image folder with from_pretrained, like QwenImagePipeline."""

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        true_cfg_scale: float = 4.0,
        image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        sigmas=None,
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
        """diffusers' arguments. image: a PIL image, an (H, W, C) array or a (C, H, W) tensor (0..255 or
        [0, 1]), resized to height x width (default 1024 x 1024, as diffusers) with Lanczos. latents: the
        packed starting point (already noised, as diffusers takes it); the picture is then not encoded."""
        picture = load_image(image)
        check_strength(strength)
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
        sigmas = strength_schedule(self.schedule(num_inference_steps, height, width, sigmas), strength)
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
        if latents is None:
            x0 = self.picture_latents(picture, width, height, generator, batch)  # (B, N, C p²)
            noise = self.prepare_latents(None, batch, height, width, generator)
            latents = noised(x0, noise, sigmas[0].to(x0.dtype))
        else:
            latents = self.prepare_latents(latents, batch, height, width, generator)
        img_shapes = [(1, height // self.size_multiple, width // self.size_multiple)]
        latents = self.denoise(
            latents, cond, uncond, true_cfg_scale, img_shapes, sigmas, callback_on_step_end, progress
        )
        return self.decode(latents, height, width, output_type, tiled_vae)

"""Inpainting: QwenImageInpaintPipeline (text-to-image weights) and QwenImageEditInpaintPipeline (Edit weights).

Image-to-image (img2img.py) where the mask says which pixels may change. After every Euler step the tokens
outside the mask are put back to the picture, noised to the next step's level, so that the known region
stays the picture and the model only fills in the masked one:

    x0 = picture latents (a posterior draw), noise = the starting noise, m = mask tokens (1 = repaint)
    x = sigma_0 noise + (1 - sigma_0) x0
    each step i: x = euler(x);  x = (1 - m) * known_i + m * x,   known_i = noised(x0, noise, sigma_{i+1})
                                                                (x0 itself after the last step)

padding_mask_crop: inpaint only a box around the mask, `padding_mask_crop` pixels wider, grown to the output's
aspect and enlarged to the output size (more pixels for a small region); the result is pasted back into the
picture (PIL output). The mask is read as diffusers' mask processor reads it: grey, Lanczos-resized, >= 0.5 is
repaint. Only the 64-channel transformer exists for Qwen-Image, so, as in diffusers, nothing reads the
masked picture's latents: `masked_image_latents` is accepted for the same call and not used.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .. import images, mmdit
from .edit import QwenImageEditPipeline
from .img2img import check_strength, load_image, noised, strength_schedule
from .text_to_image import PipelineOutput, QwenImagePipeline


def load_mask(mask_image, picture, name: str = "mask_image", image_name: str = "image"):
    """The mask as PIL (white = repaint), checked against the picture it masks."""
    if mask_image is None:
        raise ValueError(f"{name} is required: white where the picture is to be repainted, black elsewhere")
    mask = images.to_mask(mask_image, name)
    if mask.size != picture.size:
        raise ValueError(
            f"{name} is {mask.width}x{mask.height} but {image_name} is {picture.width}x{picture.height}: the "
            f"mask must have the picture's size (resize it to {picture.width}x{picture.height})"
        )
    return mask


def keep_known(x0: torch.Tensor, noise: torch.Tensor, repaint: torch.Tensor, sigmas: torch.Tensor):
    """The after_step of inpainting: outside the mask, x becomes the picture at the next step's noise level."""
    last = len(sigmas) - 2

    def after_step(i, x):
        known = x0 if i == last else noised(x0, noise, sigmas[i + 1].to(x0.dtype))
        return (1 - repaint) * known + repaint * x  # (B, N, C p²)

    return after_step


class InpaintSteps:
    """What inpainting adds to a pipeline (a mixin of QwenImagePipeline subclasses): the crop box, the mask as
    tokens, the known-region loop step, and the paste back."""

    def crop_box(self, mask, width, height, padding_mask_crop, output_type):
        """None, or the box (x1, y1, x2, y2) that padding_mask_crop asks for, checked."""
        if padding_mask_crop is None:
            return None
        if (
            not isinstance(padding_mask_crop, int)
            or isinstance(padding_mask_crop, bool)
            or padding_mask_crop < 0
        ):
            raise ValueError(
                f"padding_mask_crop must be a whole number of pixels >= 0, got {padding_mask_crop!r}"
            )
        if output_type != "pil":
            raise ValueError(
                f"padding_mask_crop pastes the result back into the picture, so output_type must be 'pil', "
                f"got {output_type!r}"
            )
        return images.crop_region(mask, width, height, padding_mask_crop)

    def mask_tokens(self, mask, width, height, crop, batch) -> torch.Tensor:
        """PIL mask -> fitted as the picture was -> latent size (nearest) -> packed (batch, N, C p²) of 0 / 1."""
        pixels = images.mask_to_tensor(
            images.fit(mask, width, height, crop, fill=crop is not None)
        )  # (1, 1, H, W)
        s, p = self.vae_scale_factor, self.transformer.config.patch_size
        small = F.interpolate(pixels, size=(height // s, width // s))  # (1, 1, h, w)
        small = small.repeat(1, self.vae.config.z_dim, 1, 1).to(
            self.device, self.transformer.img_in.weight.dtype
        )
        return mmdit.pack_latents(small, p).expand(batch, -1, -1)

    def start_inpainting(self, picture, mask, width, height, crop, batch, generator, latents, sigmas):
        """-> (starting latents, the after_step that keeps the known region, x0): the picture's posterior draw
        first, then the noise (or `latents`, taken as that noise), from the generator in diffusers' order."""
        x0 = self.picture_latents(picture, width, height, generator, batch, crop, fill=crop is not None)
        noise = self.prepare_latents(latents, batch, height, width, generator)
        repaint = self.mask_tokens(mask, width, height, crop, batch)
        return noised(x0, noise, sigmas[0].to(x0.dtype)), keep_known(x0, noise, repaint, sigmas), x0

    @staticmethod
    def paste(out: PipelineOutput, mask, picture, crop) -> PipelineOutput:
        if crop is None:
            return out
        return PipelineOutput([images.paste_back(mask, picture, image, crop) for image in out.images])


class QwenImageInpaintPipeline(InpaintSteps, QwenImagePipeline):
    """diffusers' QwenImageInpaintPipeline: the text-to-image components, a picture, a mask and a strength."""

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        true_cfg_scale: float = 4.0,
        image=None,
        mask_image=None,
        masked_image_latents=None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
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
        """diffusers' arguments; image and mask_image as QwenImageImg2ImgPipeline's image, of one size.
        latents: the packed starting noise (diffusers' own inpainting fails when given latents)."""
        picture = load_image(image)
        mask = load_mask(mask_image, picture)
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
        crop = self.crop_box(mask, width, height, padding_mask_crop, output_type)
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
        start, after_step, _ = self.start_inpainting(
            picture, mask, width, height, crop, len(cond[0]), generator, latents, sigmas
        )
        img_shapes = [(1, height // self.size_multiple, width // self.size_multiple)]
        latents = self.denoise(
            start,
            cond,
            uncond,
            true_cfg_scale,
            img_shapes,
            sigmas,
            callback_on_step_end,
            progress,
            after_step=after_step,
        )
        return self.paste(self.decode(latents, height, width, output_type, tiled_vae), mask, picture, crop)


class QwenImageEditInpaintPipeline(InpaintSteps, QwenImageEditPipeline):
    """diffusers' QwenImageEditInpaintPipeline: Qwen-Image-Edit, with a mask and a strength.

    The picture is resized to ~1024² (`vae_area`, aspect kept) and that is the output size (height and width
    are ignored, as in diffusers). Its posterior draw is both the starting point and the reference tokens
    beside the noise (Edit itself takes the posterior mean). The mask is resized with the picture."""

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt=None,
        negative_prompt=None,
        mask_image=None,
        masked_image_latents=None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
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
        rgb = self.load_images(image)
        mask = load_mask(mask_image, rgb[0])
        check_strength(strength)
        condition_images, vae_images = self.resize_images(rgb)
        picture = vae_images[0]  # the size of the output
        if height is not None or width is not None:
            warnings.warn(
                f"height and width are ignored: Edit inpainting keeps the resized picture's size, "
                f"{picture.width}x{picture.height}",
                stacklevel=2,
            )
        height, width = self.check_size(picture.height, picture.width)
        mask = images.fit(mask, width, height)  # resized with the picture
        self.check_call(
            num_inference_steps,
            height,
            width,
            output_type,
            num_images_per_prompt,
            max_sequence_length,
            true_cfg_scale,
        )
        crop = self.crop_box(mask, width, height, padding_mask_crop, output_type)
        sigmas = strength_schedule(self.schedule(num_inference_steps, height, width, sigmas), strength)
        read = None
        if prompt_embeds is None or (negative_prompt is not None and negative_prompt_embeds is None):
            read = self.image_features(condition_images)
        cond, uncond = self.prompt_embeddings(
            prompt,
            negative_prompt,
            true_cfg_scale,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            num_images_per_prompt,
            None,
            image=read,
        )
        start, after_step, x0 = self.start_inpainting(
            picture, mask, width, height, crop, len(cond[0]), generator, latents, sigmas
        )
        tokens = (1, height // self.size_multiple, width // self.size_multiple)
        latents = self.denoise(
            start,
            cond,
            uncond,
            true_cfg_scale,
            [tokens, tokens],  # the noise, then the picture's tokens (RoPE frame 1), the same size
            sigmas,
            callback_on_step_end,
            progress,
            reference=x0,
            after_step=after_step,
        )
        return self.paste(self.decode(latents, height, width, output_type, tiled_vae), mask, picture, crop)

"""Text-to-image: the components joined into QwenImagePipeline.

    prompt ─ tokenizer + Qwen2.5-VL ─> embeds (B, L, 3584), mask
    noise (B, 1, 16, H/8, W/8) ─ pack ─> x (B, N, 64)
    for each sigma of the schedule:
        v = MMDiT(x, embeds, sigma)                              predict the velocity noise - x0
        with CFG: v = v_neg + s (v - v_neg), rescaled to |v|     per token, over its 64 channels
        x = x + (sigma_next - sigma) v                           Euler step
    x ─ unpack, * latents_std + latents_mean ─> VAE decoder ─> image in [-1, 1]

Argument names follow diffusers' QwenImagePipeline, and with the same generator the starting noise
is the same tensor, so the two can be compared number for number.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import mmdit, scheduler, text_encoder, tokenizer, vae

COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


@dataclass
class PipelineOutput:
    images: object  # list of PIL images, a (B, H, W, 3) array, a (B, 3, H, W) tensor, or packed latents


class QwenImagePipeline:
    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler, device=None, offload: bool = False):
        self.tokenizer, self.text_encoder, self.transformer = tokenizer, text_encoder, transformer
        self.vae, self.scheduler = vae, scheduler
        self.device = torch.device(device or "cpu")
        self.offload = offload   # keep components on the CPU; move each to `device` only while it runs

    @classmethod
    def from_pretrained(cls, root, device=None, dtype=None, offload: bool = False) -> "QwenImagePipeline":
        """Load an official Qwen-Image folder (model_index.json + component folders).

        dtype: bf16 for GPUs (the official weights' dtype), fp32 for CPU; None keeps the files' dtype.
        offload=True keeps every component in CPU memory and moves only the active one to `device`
        (text encoder, then transformer, then VAE): the GPU needs room for the largest alone."""
        root = Path(root)
        if not root.is_dir():
            raise ckpt.CheckpointError(f"model folder {root} does not exist")
        index = root / "model_index.json"
        if not index.is_file():
            raise ckpt.CheckpointError(f"{root} is not a Qwen-Image checkpoint: no model_index.json "
                                       f"(expected {', '.join(COMPONENTS)} folders beside it)")
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise ckpt.CheckpointError(f"{root}: component folder(s) {missing} missing")
        class_name = json.loads(index.read_text()).get("_class_name", "")
        if class_name and "Edit" in class_name:
            warnings.warn(f"{root} is a {class_name} checkpoint; loading it for text-to-image", stacklevel=2)
        device = torch.device(device or "cpu")
        place = torch.device("cpu") if offload else device
        return cls(tokenizer.load(root / "tokenizer"),
                   text_encoder.load(root / "text_encoder", device=place, dtype=dtype),
                   mmdit.load(root / "transformer", device=place, dtype=dtype),
                   vae.load(root / "vae", device=place, dtype=dtype),
                   scheduler.load(root / "scheduler"), device=device, offload=offload)

    @contextlib.contextmanager
    def _active(self, module: torch.nn.Module):
        """With offload: move `module` to the device for the block, back to the CPU after."""
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, max_sequence_length: int = 1024):
        """prompt(s) -> (embeds (B * n, L, 3584), mask (B * n, L)); each prompt repeated n times in a row."""
        with self._active(self.text_encoder) as te:
            embeds, mask = text_encoder.encode_prompts(self.tokenizer, te, prompt,
                                                       max_sequence_length=max_sequence_length, device=self.device)
        return embeds.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(num_images_per_prompt, 0)

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, true_cfg_scale: float = 4.0, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, sigmas=None, num_images_per_prompt: int = 1,
                 generator=None, latents=None, prompt_embeds=None, prompt_embeds_mask=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, output_type: str = "pil",
                 callback_on_step_end=None, max_sequence_length: int = 512, tiled_vae: bool = False,
                 progress: bool = True) -> PipelineOutput:
        height, width = self._check_size(height, width)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")

        # 1. Prompts -> embeddings (positive, and negative for classifier-free guidance)
        embeds, mask = self._embeddings(prompt, prompt_embeds, prompt_embeds_mask, "prompt",
                                        num_images_per_prompt, max_sequence_length)
        use_cfg = true_cfg_scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if true_cfg_scale > 1 and not use_cfg:
            warnings.warn(f"true_cfg_scale={true_cfg_scale} has no effect without a negative_prompt "
                          "(the official examples use negative_prompt=' ')", stacklevel=3)
        if use_cfg:
            if isinstance(negative_prompt, str):   # one negative prompt serves every prompt
                negative_prompt = [negative_prompt] * (len(embeds) // num_images_per_prompt)
            neg_embeds, neg_mask = self._embeddings(negative_prompt, negative_prompt_embeds,
                                                    negative_prompt_embeds_mask, "negative_prompt",
                                                    num_images_per_prompt, max_sequence_length)
            if len(neg_embeds) != len(embeds):
                raise ValueError(f"negative_prompt gives {len(neg_embeds)} embeddings but prompt gives "
                                 f"{len(embeds)}: pass one negative prompt per prompt (or a single str)")
        batch = len(embeds)

        # 2. Starting noise, packed into tokens: (B, 1, 16, h, w) -> (B, h/2 * w/2, 64)
        h, w = height // 8, width // 8
        dtype = self.transformer.img_in.weight.dtype
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"generator is a list of {len(generator)} but the batch has {batch} images "
                                 "(prompts x num_images_per_prompt): pass one generator per image, or one in all")
            noise = _randn((batch, 1, 16, h, w), generator, self.device, dtype)
            latents = mmdit.pack_latents(noise[:, 0])
        else:
            if tuple(latents.shape) != (batch, (h // 2) * (w // 2), 64):
                raise ValueError(f"latents must be packed noise of shape {(batch, (h // 2) * (w // 2), 64)} for "
                                 f"{height}x{width}, got {tuple(latents.shape)}")
            latents = latents.to(self.device, dtype)
        img_shapes = [(1, h // 2, w // 2)]

        # 3. The schedule for this many tokens
        self.scheduler.set_timesteps(None if sigmas is not None else num_inference_steps,
                                     image_seq_len=latents.shape[1], sigmas=sigmas, device=self.device)

        # 4. Denoise: predict the velocity, combine (CFG), Euler step
        with self._active(self.transformer) as dit:
            steps = range(len(self.scheduler.timesteps))
            if progress:
                from tqdm.auto import tqdm
                steps = tqdm(steps, desc="denoising")
            for i in steps:
                t = self.scheduler.timesteps[i]
                sigma = t.expand(batch).to(dtype) / 1000                 # as the reference: t in the latents' dtype
                v = dit(latents, embeds, mask, sigma, img_shapes)
                if use_cfg:
                    v_neg = dit(latents, neg_embeds, neg_mask, sigma, img_shapes)
                    v = cfg_combine(v, v_neg, true_cfg_scale)
                latents = self.scheduler.step(v, i, latents)
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = (out or {}).get("latents", latents)

        if output_type == "latent":
            return PipelineOutput(latents)

        # 5. Decode: unpack, undo the latent normalisation, VAE
        with self._active(self.vae) as ae:
            z = mmdit.unpack_latents(latents, h, w).to(ae.post_quant_conv.weight.dtype)   # (B, 16, h, w)
            image = ae.decode(ae.denormalize_latents(z), tiled=tiled_vae)                  # (B, 3, H, W)
        return PipelineOutput(postprocess(image, output_type))

    # --- helpers -----------------------------------------------------------------------------

    def _check_size(self, height, width):
        height = 1024 if height is None else height
        width = 1024 if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int (pixels), got {v!r}")
            if v < 16:
                raise ValueError(f"{name} must be at least 16 pixels, got {v}")
        if height % 16 or width % 16:
            warnings.warn(f"height and width must be multiples of 16; {height}x{width} is rounded down to "
                          f"{height // 16 * 16}x{width // 16 * 16}", stacklevel=4)
        return int(height) // 16 * 16, int(width) // 16 * 16

    def _embeddings(self, prompt, embeds, mask, name, n, max_sequence_length):
        """Prompt text or precomputed embeddings -> (embeds, mask or None); an all-ones mask is dropped."""
        if prompt is not None and embeds is not None:
            raise ValueError(f"pass either {name} or {name}_embeds, not both")
        if prompt is None and embeds is None:
            raise ValueError(f"pass {name} (text) or {name}_embeds")
        if embeds is None:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise ValueError(f"{name} must be a str or a non-empty list of str")
            if name == "prompt" and any(isinstance(p, str) and not p.strip() for p in prompt):
                raise ValueError("prompt must not be empty: describe the image (an empty prompt is only "
                                 "meaningful as negative_prompt)")
            embeds, mask = self.encode_prompt(prompt, n, max_sequence_length)
        else:
            if embeds.ndim != 3 or embeds.shape[-1] != self.transformer.config.joint_attention_dim:
                raise ValueError(f"{name}_embeds must be (batch, length, {self.transformer.config.joint_attention_dim}),"
                                 f" got {tuple(embeds.shape)}")
            if mask is None and embeds.shape[0] > 1:
                raise ValueError(f"{name}_embeds for a batch needs {name}_embeds_mask (1 = token, 0 = padding): "
                                 "without it padding would be attended to")
            if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"{name}_embeds_mask must be {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}")
            embeds = embeds[:, :max_sequence_length].repeat_interleave(n, 0)
            mask = None if mask is None else mask[:, :max_sequence_length].repeat_interleave(n, 0)
        embeds = embeds.to(self.device, self.transformer.img_in.weight.dtype)
        if mask is not None:
            mask = mask.to(self.device)
            if bool(mask.all()):
                mask = None              # no padding: plain attention (as diffusers; also faster kernels)
        return embeds, mask


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True classifier-free guidance with norm rescale: push away from the unconditional prediction,
    then give each token the length of its conditional prediction (over the 64 channels), which
    keeps large scales from over-saturating."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    return combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


def _randn(shape, generator, device, dtype):
    """Noise as diffusers draws it: on the generator's device, one generator per sample if a list."""
    if isinstance(generator, list):
        return torch.cat([_randn((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def postprocess(image: torch.Tensor, output_type: str):
    """[-1, 1] (B, 3, H, W) -> [0, 1] tensor ("pt"), (B, H, W, 3) float array ("np") or PIL images."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in array]

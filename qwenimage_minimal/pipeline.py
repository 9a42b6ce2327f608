"""The components joined: QwenImagePipeline (text-to-image) and the Edit pipelines.

    prompt ─ tokenizer + Qwen2.5-VL ─> embeds (B, L, 3584), mask
    noise (B, 1, 16, H/8, W/8) ─ pack ─> x (B, N, 64)
    for each sigma of the schedule:
        v = MMDiT(x, embeds, sigma)                              predict the velocity noise - x0
        with CFG: v = v_neg + s (v - v_neg), rescaled to |v|     per token, over its 64 channels
        x = x + (sigma_next - sigma) v                           Euler step
    x ─ unpack, * latents_std + latents_mean ─> VAE decoder ─> image in [-1, 1]

Edit (QwenImageEditPipeline, QwenImageEditPlusPipeline, further down) changes two things: the
prompt is encoded together with the input image(s) (vision.py), and the images' VAE latents ride
along after the noise tokens at every step, [x | reference tokens], of which only x's velocity is
kept. Everything else is the loop above, shared.

Argument names follow diffusers' pipelines, and with the same generator the starting noise is the
same tensor, so the two can be compared number for number.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import mmdit, scheduler, text_encoder, tokenizer, vae, vision

COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


@dataclass
class PipelineOutput:
    images: object  # list of PIL images, a (B, H, W, 3) array, a (B, 3, H, W) tensor, or packed latents


def _check_model_folder(root: Path, what: str) -> str:
    """An official pipeline folder: model_index.json and the component folders. -> its _class_name."""
    if not root.is_dir():
        raise ckpt.CheckpointError(f"model folder {root} does not exist")
    index = root / "model_index.json"
    if not index.is_file():
        raise ckpt.CheckpointError(f"{root} is not a {what} checkpoint: no model_index.json "
                                   f"(expected {', '.join(COMPONENTS)} folders beside it)")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ckpt.CheckpointError(f"{root}: component folder(s) {missing} missing")
    return json.loads(index.read_text()).get("_class_name", "")


def _load_components(root: Path, device, dtype, offload: bool) -> dict:
    """The five components every Qwen-Image pipeline has, on `device` (on the CPU with offload)."""
    place = torch.device("cpu") if offload else device
    return dict(tokenizer=tokenizer.load(root / "tokenizer"),
                text_encoder=text_encoder.load(root / "text_encoder", device=place, dtype=dtype),
                transformer=mmdit.load(root / "transformer", device=place, dtype=dtype),
                vae=vae.load(root / "vae", device=place, dtype=dtype),
                scheduler=scheduler.load(root / "scheduler"))


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
        class_name = _check_model_folder(root, "Qwen-Image")
        if "Edit" in class_name:
            warnings.warn(f"{root} is a {class_name} checkpoint; loading it for text-to-image", stacklevel=2)
        device = torch.device(device or "cpu")
        return cls(**_load_components(root, device, dtype, offload), device=device, offload=offload)

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
        self._check_call(num_inference_steps, output_type, num_images_per_prompt)

        # 1. Prompts -> embeddings (positive, and negative for classifier-free guidance)
        encode = lambda p: self.encode_prompt(p, num_images_per_prompt, max_sequence_length)
        cond, uncond = self._prompt_pair(prompt, negative_prompt, true_cfg_scale, prompt_embeds, prompt_embeds_mask,
                                         negative_prompt_embeds, negative_prompt_embeds_mask, encode,
                                         num_images_per_prompt, max_sequence_length)
        batch = len(cond[0])

        # 2. Starting noise, packed into tokens: (B, 1, 16, h, w) -> (B, h/2 * w/2, 64)
        latents = self._initial_latents(latents, batch, height, width, generator)
        img_shapes = [(1, height // 16, width // 16)]

        # 3-4. The schedule for this many tokens; denoise
        latents = self._denoise(latents, cond, uncond, true_cfg_scale, img_shapes, num_inference_steps, sigmas,
                                callback_on_step_end, progress)
        return self._output(latents, height, width, output_type, tiled_vae)

    # --- the steps every pipeline shares --------------------------------------------------------

    def _check_call(self, num_inference_steps, output_type, num_images_per_prompt):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")

    def _prompt_pair(self, prompt, negative_prompt, true_cfg_scale, prompt_embeds, prompt_embeds_mask,
                     negative_prompt_embeds, negative_prompt_embeds_mask, encode, n, max_sequence_length):
        """-> (embeds, mask), and the same for the negative prompt when CFG runs (else None)."""
        cond = self._embeddings(prompt, prompt_embeds, prompt_embeds_mask, "prompt", encode, n, max_sequence_length)
        use_cfg = true_cfg_scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if true_cfg_scale > 1 and not use_cfg:
            warnings.warn(f"true_cfg_scale={true_cfg_scale} has no effect without a negative_prompt "
                          "(the official examples use negative_prompt=' ')", stacklevel=4)
        if not use_cfg:
            return cond, None
        if isinstance(negative_prompt, str):   # one negative prompt serves every prompt
            negative_prompt = [negative_prompt] * (len(cond[0]) // n)
        uncond = self._embeddings(negative_prompt, negative_prompt_embeds, negative_prompt_embeds_mask,
                                  "negative_prompt", encode, n, max_sequence_length)
        if len(uncond[0]) != len(cond[0]):
            raise ValueError(f"negative_prompt gives {len(uncond[0])} embeddings but prompt gives "
                             f"{len(cond[0])}: pass one negative prompt per prompt (or a single str)")
        return cond, uncond

    def _initial_latents(self, latents, batch, height, width, generator):
        h, w = height // 8, width // 8
        dtype = self.transformer.img_in.weight.dtype
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"generator is a list of {len(generator)} but the batch has {batch} images "
                                 "(prompts x num_images_per_prompt): pass one generator per image, or one in all")
            noise = _randn((batch, 1, 16, h, w), generator, self.device, dtype)
            return mmdit.pack_latents(noise[:, 0])
        if tuple(latents.shape) != (batch, (h // 2) * (w // 2), 64):
            raise ValueError(f"latents must be packed noise of shape {(batch, (h // 2) * (w // 2), 64)} for "
                             f"{height}x{width}, got {tuple(latents.shape)}")
        return latents.to(self.device, dtype)

    def _denoise(self, latents, cond, uncond, true_cfg_scale, img_shapes, num_inference_steps, sigmas,
                 callback_on_step_end, progress, image_latents=None):
        """The sampling loop. With `image_latents` (Edit) the reference tokens ride along after the
        noise tokens; the MMDiT sees [noise | references] and only the noise tokens' velocity is kept."""
        batch, n_noise = latents.shape[:2]
        dtype = latents.dtype
        self.scheduler.set_timesteps(None if sigmas is not None else num_inference_steps,
                                     image_seq_len=n_noise, sigmas=sigmas, device=self.device)
        with self._active(self.transformer) as dit:
            steps = range(len(self.scheduler.timesteps))
            if progress:
                from tqdm.auto import tqdm
                steps = tqdm(steps, desc="denoising")
            for i in steps:
                t = self.scheduler.timesteps[i]
                sigma = t.expand(batch).to(dtype) / 1000                 # as the reference: t in the latents' dtype
                x = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
                v = dit(x, *cond, sigma, img_shapes)[:, :n_noise]
                if uncond is not None:
                    v_neg = dit(x, *uncond, sigma, img_shapes)[:, :n_noise]
                    v = cfg_combine(v, v_neg, true_cfg_scale)
                latents = self.scheduler.step(v, i, latents)
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = (out or {}).get("latents", latents)
        return latents

    def _output(self, latents, height, width, output_type, tiled_vae):
        """Packed latents -> unpack, undo the latent normalisation, VAE decode -> output_type."""
        if output_type == "latent":
            return PipelineOutput(latents)
        with self._active(self.vae) as ae:
            z = mmdit.unpack_latents(latents, height // 8, width // 8).to(ae.post_quant_conv.weight.dtype)
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

    def _embeddings(self, prompt, embeds, mask, name, encode, n, max_sequence_length):
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
            embeds, mask = encode(prompt)
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


# ---------------------------------------------------------------------------------------------
# Image editing
# ---------------------------------------------------------------------------------------------

def calculate_dimensions(target_area: int, aspect_ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels with this width/height ratio, multiples of 32."""
    width = math.sqrt(target_area * aspect_ratio)
    height = width / aspect_ratio
    return round(width / 32) * 32, round(height / 32) * 32


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit: one input image and an instruction -> the edited image.

        image ─ resize to ~1024x1024 area (aspect kept, multiples of 32) ─┬─ VAE encode (mean),
              │                                                          │  normalise, pack ─> reference tokens
              └─ vision processor + tower ─> features in the prompt ─────┴─ Qwen2.5-VL ─> prompt embeddings
        noise tokens ─ MMDiT([noise | reference], prompt), keep the noise part ─ Euler ─> VAE decode

    The reference tokens are the same at every step (they are never noised); RoPE gives them
    frame index 1, so the MMDiT can tell them from the image being generated (frame 0). The output
    size defaults to the input's (resized as above). `from_pretrained` reads model_index.json and
    returns a QwenImageEditPlusPipeline for Edit-2509 / Edit-2511 checkpoints."""

    numbered_pictures = False          # prompt prefix "<image>" (Edit) or "Picture 1: <image>..." (Edit-2509+)
    max_images = 1
    output_area = 1024 * 1024          # the default output size: the (last) image's aspect at this area
    vae_area = 1024 * 1024
    condition_area = None              # the vision tower sees the VAE-sized image

    def __init__(self, tokenizer, text_encoder, vision_tower, transformer, vae, scheduler, processor_config=None,
                 device=None, offload: bool = False):
        super().__init__(tokenizer, text_encoder, transformer, vae, scheduler, device=device, offload=offload)
        self.vision_tower = vision_tower
        self.processor_config = processor_config or vision.ImageProcessorConfig()

    @classmethod
    def from_pretrained(cls, root, device=None, dtype=None, offload: bool = False) -> "QwenImageEditPipeline":
        """Load an official Qwen-Image-Edit / -Edit-2509 / -Edit-2511 folder (same layout as Qwen-Image,
        plus processor/). Called on QwenImageEditPipeline it picks the class model_index.json names."""
        root = Path(root)
        class_name = _check_model_folder(root, "Qwen-Image-Edit")
        kinds = {"QwenImageEditPipeline": QwenImageEditPipeline, "QwenImageEditPlusPipeline": QwenImageEditPlusPipeline}
        if class_name not in kinds:
            raise ckpt.CheckpointError(f"{root}/model_index.json names {class_name!r}, not an Edit pipeline "
                                       f"({', '.join(kinds)}); for text-to-image use QwenImagePipeline")
        if cls is QwenImageEditPipeline:
            cls = kinds[class_name]
        if not (root / "processor" / "preprocessor_config.json").is_file():
            raise ckpt.CheckpointError(f"{root}/processor/preprocessor_config.json is missing: Edit checkpoints "
                                       "ship it (the vision tower's image sizes); download it too")
        device = torch.device(device or "cpu")
        place = torch.device("cpu") if offload else device
        return cls(**_load_components(root, device, dtype, offload),
                   vision_tower=vision.load(root / "text_encoder", device=place, dtype=dtype),
                   processor_config=vision.load_processor_config(root / "processor"), device=device, offload=offload)

    # --- images ------------------------------------------------------------------------------

    def load_images(self, image) -> list:
        """image or list of images -> list of PIL RGB images, checked (count, type, size)."""
        if image is None:
            raise ValueError(f"image is required: {type(self).__name__} edits an input image")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("image is an empty list: pass at least one image")
        if len(images) > self.max_images:
            hint = (" (QwenImageEditPlusPipeline, for Edit-2509/2511 checkpoints, takes up to "
                    f"{QwenImageEditPlusPipeline.max_images})" if self.max_images == 1 else "")
            raise ValueError(f"{type(self).__name__} takes at most {self.max_images} image(s), got {len(images)}{hint}")
        names = [f"image[{i}]" if len(images) > 1 else "image" for i in range(len(images))]
        images = [vision.to_rgb(img, name=name) for img, name in zip(images, names)]
        for img, name in zip(images, names):
            if max(img.size) / min(img.size) > 200:
                raise ValueError(f"{name} is {img.width}x{img.height}: aspect ratios over 200:1 are not supported "
                                 "(Qwen2.5-VL's image processor refuses them); crop or pad it")
        return images

    def prepare_images(self, image) -> tuple[list, list]:
        """image(s) -> (condition images for the vision tower, VAE images), PIL RGB, resized as the
        official pipelines resize them (Lanczos, areas from `condition_area` / `vae_area`)."""
        return self._resize_images(self.load_images(image))

    def _resize_images(self, images) -> tuple[list, list]:
        from PIL import Image
        vae_images, condition_images = [], []
        for img in images:
            ratio = img.width / img.height
            vae_images.append(img.resize(calculate_dimensions(self.vae_area, ratio), Image.LANCZOS))
            condition_images.append(vae_images[-1] if self.condition_area is None else
                                    img.resize(calculate_dimensions(self.condition_area, ratio), Image.LANCZOS))
        return condition_images, vae_images

    def image_features(self, condition_images) -> tuple[torch.Tensor, list]:
        """PIL images -> (vision tower features (N, 3584), grids), all images in order."""
        inputs = [vision.preprocess(img, self.processor_config) for img in condition_images]
        pixels = torch.cat([p for p, _ in inputs]).to(self.device)
        grids = [g for _, g in inputs]
        with self._active(self.vision_tower) as tower, torch.no_grad():
            return tower(pixels, grids), grids

    def encode_image_latents(self, vae_images) -> tuple[torch.Tensor, list]:
        """PIL images -> (normalised, packed latents (1, sum N_i, 64), their img_shapes)."""
        tokens, shapes = [], []
        with self._active(self.vae) as ae, torch.no_grad():
            dtype = ae.post_quant_conv.weight.dtype
            for img in vae_images:
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
                x = (2 * x - 1).to(self.device, dtype)                               # (1, 3, H, W) in [-1, 1]
                z = ae.normalize_latents(ae.encode(x).mean)                          # (1, 16, H/8, W/8)
                tokens.append(mmdit.pack_latents(z))                                 # (1, H/16 * W/16, 64)
                shapes.append((1, z.shape[2] // 2, z.shape[3] // 2))
        return torch.cat(tokens, dim=1), shapes

    # --- prompts -----------------------------------------------------------------------------

    def encode_prompt(self, prompt, image=None, num_images_per_prompt: int = 1, image_positions: str = "3d",
                      features=None):
        """prompt(s) + image(s) -> (embeds (B * n, L, 3584), mask (B * n, L)).

        L includes the image's tokens: they follow the 64 dropped template tokens. `features`
        (from `image_features`) skips the vision tower when the caller already ran it.
        image_positions="sequential" reproduces diffusers 0.42.1 (see text_encoder.encode_prompts)."""
        if features is None:
            features = self.image_features(self.prepare_images(image)[0])
        features, grids = features
        prefix = text_encoder.edit_prompt_prefix(len(grids), self.numbered_pictures)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with self._active(self.text_encoder) as te:
            embeds, mask = text_encoder.encode_prompts(
                self.tokenizer, te, [prefix + p if isinstance(p, str) else p for p in prompts],
                text_encoder.EDIT_TEMPLATE, text_encoder.EDIT_DROP, max_sequence_length=None, device=self.device,
                image_features=features, image_grid_thw=grids, merge_size=self.vision_tower.config.spatial_merge_size,
                image_positions=image_positions)
        return embeds.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(num_images_per_prompt, 0)

    # --- the edit ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, image=None, prompt=None, negative_prompt=None, true_cfg_scale: float = 4.0,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 num_images_per_prompt: int = 1, generator=None, latents=None, prompt_embeds=None,
                 prompt_embeds_mask=None, negative_prompt_embeds=None, negative_prompt_embeds_mask=None,
                 output_type: str = "pil", callback_on_step_end=None, max_sequence_length: int = 512,
                 tiled_vae: bool = False, progress: bool = True) -> PipelineOutput:
        """Same arguments as diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline.

        image: a PIL image, an (H, W, C) array or a (C, H, W) tensor (values 0..255 or [0, 1]),
        or a list of them for Edit-2509+. height/width default to the (last) image's size at
        ~1024x1024 area. max_sequence_length is only checked, as in diffusers: Edit prompts are
        never cut, since the image tokens are part of them."""
        if not 1 <= max_sequence_length <= text_encoder.MAX_PROMPT_TOKENS:
            raise ValueError(f"max_sequence_length must be in 1..{text_encoder.MAX_PROMPT_TOKENS}, "
                             f"got {max_sequence_length}")
        images = self.load_images(image)
        condition_images, vae_images = self._resize_images(images)
        default_w, default_h = calculate_dimensions(self.output_area, images[-1].width / images[-1].height)
        height, width = self._check_size(height or default_h, width or default_w)
        self._check_call(num_inference_steps, output_type, num_images_per_prompt)

        # 1. Prompts (+ the images, through the vision tower once) -> embeddings
        features = None
        if prompt_embeds is None or (negative_prompt is not None and negative_prompt_embeds is None):
            features = self.image_features(condition_images)
        encode = lambda p: self.encode_prompt(p, num_images_per_prompt=num_images_per_prompt, features=features)
        cond, uncond = self._prompt_pair(prompt, negative_prompt, true_cfg_scale, prompt_embeds, prompt_embeds_mask,
                                         negative_prompt_embeds, negative_prompt_embeds_mask, encode,
                                         num_images_per_prompt, None)
        batch = len(cond[0])

        # 2. Noise tokens, and the reference images' tokens (the same for every sample)
        latents = self._initial_latents(latents, batch, height, width, generator)
        image_latents, image_shapes = self.encode_image_latents(vae_images)
        image_latents = image_latents.to(latents.dtype).expand(batch, -1, -1)
        img_shapes = [(1, height // 16, width // 16), *image_shapes]

        # 3-4. Denoise [noise | references], keep the noise tokens
        latents = self._denoise(latents, cond, uncond, true_cfg_scale, img_shapes, num_inference_steps, sigmas,
                                callback_on_step_end, progress, image_latents=image_latents)
        return self._output(latents, height, width, output_type, tiled_vae)


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509 and -2511: 1 to 3 input images, named "Picture 1:", "Picture 2:", ... in
    the prompt. Each image is read by the vision tower at ~384x384 area and encoded by the VAE at
    ~1024x1024 area; the output size follows the last image. Edit-2511's transformer config sets
    `zero_cond_t`: the reference tokens are then modulated as if t = 0 (mmdit.py)."""

    numbered_pictures = True
    max_images = 3
    condition_area = 384 * 384


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

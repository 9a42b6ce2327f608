"""Image editing: QwenImageEditPipeline (Qwen-Image-Edit) and QwenImageEditPlusPipeline (Edit-2509 / 2511).

Edit changes two things of text-to-image (text_to_image.py): the prompt is encoded together with the input
image(s), read by the vision tower, and the images' VAE latents ride along after the noise tokens at every
step (as `reference` tokens, never noised).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from .. import images, mmdit, prompts, streaming, vision, weights
from .loading import AREA_KEYS, check_model_folder, load_components, read_pipeline_defaults, setup_parallel
from .text_to_image import PipelineOutput, QwenImagePipeline


class ImageFeatures(NamedTuple):
    """The vision tower's reading of the input image(s): (N, 3584) features and each image's patch grid."""

    features: torch.Tensor
    grids: list


def edit_pipeline_class(root: Path):
    """The Edit class an official folder's model_index.json names: Edit, or Plus (Edit-2509 / 2511)."""
    class_name = check_model_folder(root, "Qwen-Image-Edit")
    kinds = {
        "QwenImageEditPipeline": QwenImageEditPipeline,
        "QwenImageEditInpaintPipeline": QwenImageEditPipeline,  # diffusers' save_pretrained of Edit-inpainting
        "QwenImageEditPlusPipeline": QwenImageEditPlusPipeline,
    }
    if class_name not in kinds:
        raise weights.CheckpointError(
            f"{root}/model_index.json names {class_name!r}, not an Edit pipeline "
            f"({', '.join(kinds)}); for text-to-image use QwenImagePipeline"
        )
    return kinds[class_name]


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

    numbered_pictures = False  # prompt prefix "<image>" (Edit) or "Picture 1: <image>..." (Edit-2509+)
    max_images = 1
    output_area = 1024 * 1024  # the default output size: the (last) image's aspect at this area
    vae_area = 1024 * 1024
    condition_area = None  # the vision tower sees the VAE-sized image

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vision_tower,
        transformer,
        vae,
        scheduler,
        processor_config=None,
        device=None,
        offload: bool = False,
        max_gpu_memory=None,
        compile: bool = False,
        mesh=None,
    ):
        super().__init__(
            tokenizer,
            text_encoder,
            transformer,
            vae,
            scheduler,
            device=device,
            offload=offload,
            max_gpu_memory=max_gpu_memory,
            compile=compile,
            mesh=mesh,
        )
        self.vision_tower = vision_tower
        self.processor_config = processor_config or images.ImageProcessorConfig()

    @classmethod
    def from_pretrained(
        cls,
        root,
        device=None,
        dtype=None,
        offload: bool = False,
        check_finite: bool = True,
        load_transformer: bool = True,
        max_gpu_memory=None,
        compile: bool = False,
        tensor_parallel: int = 1,
        cfg_parallel: bool = False,
    ) -> "QwenImageEditPipeline":
        """Load an official Qwen-Image-Edit / -Edit-2509 / -Edit-2511 folder (same layout as Qwen-Image,
        plus processor/). Called on QwenImageEditPipeline it picks the class model_index.json names.
        A folder's pipeline_defaults.json may set the image areas (`vae_area`, `condition_area`,
        `output_area`: the nano Edit model's are 128², 96², 128²); the official folders have none, and the
        official areas apply. The options are QwenImagePipeline.from_pretrained's."""
        root = Path(root)
        named = edit_pipeline_class(root)
        if cls is QwenImageEditPipeline:
            cls = named
        if not (root / "processor" / "preprocessor_config.json").is_file():
            raise weights.CheckpointError(
                f"{root}/processor/preprocessor_config.json is missing: Edit checkpoints "
                "ship it (the vision tower's image sizes); download it too"
            )
        device = torch.device(device or "cpu")
        if max_gpu_memory is not None:
            streaming.parse_memory(max_gpu_memory)
        offload_all = offload or max_gpu_memory is not None
        mesh, device = setup_parallel(root, tensor_parallel, cfg_parallel, device, offload_all)
        place = torch.device("cpu") if offload_all else device
        areas = {k: v for k, v in read_pipeline_defaults(root).items() if k in AREA_KEYS}
        pipe = cls(
            **load_components(root, device, dtype, offload_all, check_finite, load_transformer, mesh),
            vision_tower=vision.load(
                root / "text_encoder", device=place, dtype=dtype, check_finite=check_finite
            ),
            processor_config=images.load_processor_config(root / "processor"),
            device=device,
            offload=offload,
            max_gpu_memory=max_gpu_memory,
            compile=compile,
            mesh=mesh,
        )
        for name, area in areas.items():  # a folder trained at another size states its areas (the nano Edit)
            setattr(pipe, name, area)
        return pipe

    # --- images ------------------------------------------------------------------------------

    @classmethod
    def load_images(cls, image) -> list:
        """image or list of images -> list of PIL RGB images, checked (count, type, size). A class
        method: the command line checks its inputs with it before any model loads."""
        if image is None:
            raise ValueError(f"image is required: {cls.__name__} edits an input image")
        given = list(image) if isinstance(image, (list, tuple)) else [image]
        if not given:
            raise ValueError("image is an empty list: pass at least one image")
        if len(given) > cls.max_images:
            hint = (
                " (QwenImageEditPlusPipeline, for Edit-2509/2511 checkpoints, takes up to "
                f"{QwenImageEditPlusPipeline.max_images})"
                if cls.max_images == 1
                else ""
            )
            raise ValueError(
                f"{cls.__name__} takes at most {cls.max_images} image(s), got {len(given)}{hint}"
            )
        return [
            images.to_rgb(img, name=f"image[{i}]" if len(given) > 1 else "image")
            for i, img in enumerate(given)
        ]

    def resize_images(self, rgb_images) -> tuple[list, list]:
        """PIL RGB images -> (condition images for the vision tower, VAE images), resized as the
        official pipelines resize them (Lanczos, areas from `condition_area` / `vae_area`)."""
        vae_images = [images.resize_to_area(img, self.vae_area) for img in rgb_images]
        if self.condition_area is None:
            return vae_images, vae_images
        return [images.resize_to_area(img, self.condition_area) for img in rgb_images], vae_images

    def prepare_images(self, image) -> tuple[list, list]:
        """image(s) as __call__ takes them -> (condition images, VAE images): load_images, then resize_images."""
        return self.resize_images(self.load_images(image))

    def image_features(self, condition_images) -> ImageFeatures:
        """PIL images -> the vision tower's features (N, 3584) and grids, all images in order."""
        inputs = [images.preprocess(img, self.processor_config) for img in condition_images]
        pixels = torch.cat([p for p, _ in inputs]).to(self.device)
        grids = [g for _, g in inputs]
        with self.active(self.vision_tower) as tower, torch.no_grad():
            return ImageFeatures(tower(pixels, grids), grids)

    def encode_image_latents(self, vae_images) -> tuple[torch.Tensor, list]:
        """PIL images -> (normalised, packed latents (1, sum N_i, C p²), their img_shapes)."""
        p = self.transformer.config.patch_size
        tokens, shapes = [], []
        with self.active(self.vae) as ae, torch.no_grad():
            dtype = ae.post_quant_conv.weight.dtype
            for img in vae_images:
                x = images.to_tensor(img).to(self.device, dtype)  # (1, 3, H, W) in [-1, 1]
                z = ae.normalize_latents(ae.encode(x).mean)  # (1, C, H/8, W/8)
                tokens.append(mmdit.pack_latents(z, p))  # (1, H/16 * W/16, C p²)
                shapes.append((1, z.shape[2] // p, z.shape[3] // p))
        return torch.cat(tokens, dim=1), shapes

    # --- prompts -----------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt,
        image=None,
        num_images_per_prompt: int = 1,
        max_sequence_length=None,
        *,
        image_positions: str = "3d",
    ):
        """prompt(s) + image(s) -> (embeds (B * n, L, 3584), mask (B * n, L)).

        `image`: the image(s) as __call__ takes them, or their ImageFeatures (from `image_features`,
        which skips the vision tower when the caller already ran it). L includes the images' tokens:
        they follow the 64 dropped template tokens. max_sequence_length is accepted for the common
        signature and not used, as in diffusers: Edit prompts are never cut.
        image_positions="sequential" reproduces diffusers 0.42.1 (see prompts.encode_prompts)."""
        prompts.check_max_sequence_length(
            max_sequence_length, allow_none=True, hint=" (image_positions is passed by name)"
        )
        read = (
            image if isinstance(image, ImageFeatures) else self.image_features(self.prepare_images(image)[0])
        )
        prefix = prompts.edit_prompt_prefix(len(read.grids), self.numbered_pictures)
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        with self.active(self.text_encoder) as te:
            embeds, mask = prompts.encode_prompts(
                self.tokenizer,
                te,
                [prefix + p if isinstance(p, str) else p for p in texts],
                prompts.EDIT_TEMPLATE,
                prompts.EDIT_PREFIX_TOKENS,
                max_sequence_length=None,
                device=self.device,
                image_features=read.features,
                image_grid_thw=read.grids,
                merge_size=self.vision_tower.config.spatial_merge_size,
                image_positions=image_positions,
            )
        return embeds.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(
            num_images_per_prompt, 0
        )

    # --- the edit ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt=None,
        negative_prompt=None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
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
        """Same arguments as diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline.

        image: a PIL image, an (H, W, C) array or a (C, H, W) tensor (values 0..255 or [0, 1]),
        or a list of them for Edit-2509+. height/width default to the (last) image's size at
        ~1024x1024 area. max_sequence_length is only checked, as in diffusers: Edit prompts are
        never cut, since the image tokens are part of them."""
        rgb_images = self.load_images(image)
        condition_images, vae_images = self.resize_images(rgb_images)
        default_w, default_h = images.calculate_dimensions(
            self.output_area, rgb_images[-1].width / rgb_images[-1].height
        )
        height, width = self.check_size(height or default_h, width or default_w)
        self.check_call(
            num_inference_steps,
            height,
            width,
            output_type,
            num_images_per_prompt,
            max_sequence_length,
            true_cfg_scale,
        )
        sigmas = self.schedule(num_inference_steps, height, width, sigmas)  # (steps + 1,), last 0

        # 1. Prompts (+ the images, through the vision tower once) -> embeddings
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
        batch = len(cond[0])

        # 2. Noise tokens, and the reference images' tokens (the same for every sample)
        latents = self.prepare_latents(latents, batch, height, width, generator)
        reference, reference_shapes = self.encode_image_latents(vae_images)
        reference = reference.to(latents.dtype).expand(batch, -1, -1)
        img_shapes = [(1, height // self.size_multiple, width // self.size_multiple), *reference_shapes]

        # 3. Denoise [noise | references], keep the noise tokens; 4. decode
        latents = self.denoise(
            latents,
            cond,
            uncond,
            true_cfg_scale,
            img_shapes,
            sigmas,
            callback_on_step_end,
            progress,
            reference=reference,
        )
        return self.decode(latents, height, width, output_type, tiled_vae)


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509 and -2511: 1 to 3 input images, named "Picture 1:", "Picture 2:", ... in
    the prompt. Each image is read by the vision tower at ~384x384 area and encoded by the VAE at
    ~1024x1024 area; the output size follows the last image. Edit-2511's transformer config sets
    `zero_cond_t`: the reference tokens are then modulated as if t = 0 (mmdit.py)."""

    numbered_pictures = True
    max_images = 3
    condition_area = 384 * 384

"""QwenImagePipeline: text-to-image, and the steps every Qwen-Image pipeline shares.

    prompt ─ template + Qwen2.5-VL (prompts.py) ─> embeds (B, L, 3584), mask
    noise (B, 16, H/8, W/8) ─ pack ─> x (B, N, 64)
    schedule ─> sigmas (steps + 1,), handed to denoise
    denoise (sampling.py): Euler steps along the MMDiT's velocity, with true CFG
    x ─ unpack, * latents_std + latents_mean ─> VAE decoder ─> image in [-1, 1] ─> PIL (images.py)

The class only orchestrates: load the components, encode, denoise, decode, and check the arguments once,
up front. Every size comes from the loaded configs: latent channels (vae.z_dim), the VAE's downsampling
(8 for the official VAE), the MMDiT's patch (2) and text width (3584). Argument names follow diffusers'
pipelines, and with the same generator the starting noise is the same tensor, so the two can be
compared number for number.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import images, lora, mmdit, parallel, prompts, sampling, scheduler, streaming, weights
from .loading import check_model_folder, load_components, setup_parallel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

MAX_SIDE = 16384  # pixels: Edit's default size for a 200:1 image at 1024² area is 14496 x 64


@dataclass
class PipelineOutput:
    images: object  # list of PIL images, a (B, H, W, 3) array, a (B, 3, H, W) tensor, or packed latents


def check_generators(generator, batch: int) -> None:
    """A list of generators must have one per image of the batch."""
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"generator is a list of {len(generator)} but the batch has {batch} images "
            "(prompts x num_images_per_prompt): pass one generator per image, or one in all"
        )


class QwenImagePipeline:
    def __init__(
        self,
        tokenizer,
        text_encoder,
        transformer,
        vae,
        scheduler,
        device=None,
        offload: bool = False,
        max_gpu_memory=None,
        compile: bool = False,
        mesh=None,
    ):
        self.tokenizer, self.text_encoder, self.transformer = tokenizer, text_encoder, transformer
        # Several processes (parallel.py): the (cfg, tp) device mesh; a "cfg" dimension of 2 runs the two CFG
        # passes on two processes, as one batch of 2 split in halves (CFGParallel). None: one process.
        self.mesh = mesh
        self.cfg_parallel = mesh is not None and mesh["cfg"].size() > 1
        self.vae, self.scheduler = vae, scheduler
        self.device = torch.device(device or "cpu")
        self.offload = offload  # keep components on the CPU; move each to `device` only while it runs
        # Under a memory budget the transformer's blocks are streamed (streaming.py), the other components
        # take turns on the device as with offload, and both CFG passes run as one batch.
        self.streamer = None
        if max_gpu_memory is not None:
            self.streamer = streaming.WeightStreamer(
                transformer, self.device, streaming.parse_memory(max_gpu_memory)
            )
            self.offload = True
        self.batch_cfg = self.streamer is not None or self.cfg_parallel
        # The sampling loop's two steps, handed to sampling.denoise: the package's own functions. The course's
        # capstone (assignments/capstone.py) puts a student's here and draws with them.
        self.cfg_combine, self.euler_step = sampling.cfg_combine, sampling.euler_step
        if compile:
            mmdit.compile_blocks(transformer)
        dit, ae, te = transformer.config, vae.config, text_encoder.config
        if dit.latent_channels != ae.z_dim or dit.out_channels != ae.z_dim:
            raise weights.CheckpointError(
                f"the transformer reads {dit.latent_channels} and writes {dit.out_channels} latent channels "
                f"(in_channels {dit.in_channels} / patch {dit.patch_size}², out_channels) but the VAE's "
                f"z_dim is {ae.z_dim}: the components do not belong together"
            )
        if te.hidden_size != dit.joint_attention_dim:
            raise weights.CheckpointError(
                f"the text encoder is {te.hidden_size} wide but the transformer's "
                f"joint_attention_dim is {dit.joint_attention_dim}"
            )
        if tokenizer.vocab_size > te.vocab_size:
            raise weights.CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder "
                f"embeds only {te.vocab_size}"
            )

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for Qwen-Image)."""
        return self.vae.config.scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: one packed token is a patch of latent pixels (16 px)."""
        return self.vae.config.scale_factor * self.transformer.config.patch_size

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
    ) -> "QwenImagePipeline":
        """Load an official Qwen-Image folder (model_index.json + component folders).

        dtype: bf16 for GPUs (the official weights' dtype), fp32 for CPU; None keeps the files' dtype.
        offload=True keeps every component in CPU memory and moves only the active one to `device`
        (text encoder, then transformer, then VAE): the GPU needs room for the largest alone.
        max_gpu_memory (e.g. "24GB" or 24): a budget for the transformer; the blocks that do not fit are
        streamed from pinned CPU memory at every step (streaming.py), the rest is offloaded as above.
        compile=True: torch.compile each transformer block (regional compilation, mmdit.compile_blocks).
        check_finite=False skips the scan of every weight for NaN/Inf (a little faster to load).
        load_transformer=False: the transformer's config only (weights on meta), to encode prompts.
        tensor_parallel=n, cfg_parallel=True: under torchrun with cfg (2 or 1) x n processes, the transformer's
        blocks split across n processes and the two CFG passes on two (parallel.py); every process returns
        the same result."""
        root = Path(root)
        class_name = check_model_folder(root, "Qwen-Image")
        if "Edit" in class_name:
            warnings.warn(f"{root} is a {class_name} checkpoint; loading it for text-to-image", stacklevel=2)
        device = torch.device(device or "cpu")
        if max_gpu_memory is not None:
            streaming.parse_memory(max_gpu_memory)  # a bad value fails before minutes of loading
        memory = offload or max_gpu_memory is not None
        mesh, device = setup_parallel(root, tensor_parallel, cfg_parallel, device, memory)
        return cls(
            **load_components(root, device, dtype, memory, check_finite, load_transformer, mesh),
            device=device,
            offload=offload,
            max_gpu_memory=max_gpu_memory,
            compile=compile,
            mesh=mesh,
        )

    # --- LoRA, with diffusers' method names (lora.py) ------------------------------------------

    def load_lora_weights(self, path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Add the transformer LoRA in `path` (any format lora.py reads) as `adapter_name`. -> its name."""
        lora.check_scale(scale, "scale")  # before the file is read
        if self.mesh is not None and self.mesh["tp"].size() > 1:
            raise ValueError("load_lora_weights: a LoRA cannot be added to a tensor-parallel transformer yet")
        adapters, _ = lora.read_lora(path, self.transformer)
        name = adapter_name or f"default_{len(lora.adapter_names(self.transformer))}"
        lora.load_adapter(self.transformer, adapters, name, scale)
        return name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        lora.set_adapters(self.transformer, adapter_names, adapter_weights)

    def fuse_lora(self) -> None:
        lora.fuse(self.transformer)

    def unfuse_lora(self) -> None:
        lora.unfuse(self.transformer)

    def unload_lora_weights(self) -> None:
        lora.unload(self.transformer)

    @contextlib.contextmanager
    def active(self, module: torch.nn.Module):
        """With offload: move `module` to the device for the block, back to the CPU after. A streamed
        transformer puts its resident blocks on the device and streams the others (streaming.py)."""
        if module is self.transformer and self.streamer is not None:
            with self.streamer.on_device():
                yield module
            return
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def encode_prompt(
        self,
        prompt,
        image=None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = prompts.MAX_PROMPT_TOKENS,
    ):
        """prompt(s) -> (embeds (B * n, L, 3584), mask (B * n, L)); each prompt repeated n times in a row.

        The same signature as the Edit pipelines' (whose `image` is the picture(s) to edit)."""
        if image is not None:
            hint = " (pass num_images_per_prompt by name)" if isinstance(image, int) else ""
            raise ValueError(
                f"image: text-to-image takes no input image, got {image!r}{hint}; "
                "use QwenImageEditPipeline to edit one"
            )
        with self.active(self.text_encoder) as te:
            embeds, mask = prompts.encode_prompts(
                self.tokenizer, te, prompt, max_sequence_length=max_sequence_length, device=self.device
            )
        return embeds.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(
            num_images_per_prompt, 0
        )

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
        height, width = self.check_size(1024 if height is None else height, 1024 if width is None else width)
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

        # 1. Prompts -> embeddings (positive, and negative for classifier-free guidance)
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
        # 2. Starting noise, packed into tokens: (B, 16, H/8, W/8) -> (B, H/16 * W/16, 64)
        latents = self.prepare_latents(latents, len(cond[0]), height, width, generator)
        img_shapes = [(1, height // self.size_multiple, width // self.size_multiple)]
        # 3. Denoise, 4. decode
        latents = self.denoise(
            latents, cond, uncond, true_cfg_scale, img_shapes, sigmas, callback_on_step_end, progress
        )
        return self.decode(latents, height, width, output_type, tiled_vae)

    # --- the steps every pipeline shares --------------------------------------------------------

    def check_size(self, height, width) -> tuple[int, int]:
        """Integers, at least one packed token, rounded down to the size multiple (with a warning)."""
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int (pixels), got {v!r}")
            if v < m:
                raise ValueError(f"{name} must be at least {m} pixels, got {v}")
            if v > MAX_SIDE:
                raise ValueError(f"{name} must be at most {MAX_SIDE} pixels, got {v}")
        if height % m or width % m:
            warnings.warn(
                f"height and width must be multiples of {m}; {height}x{width} is rounded down to "
                f"{height // m * m}x{width // m * m}",
                stacklevel=3,
            )
        return int(height) // m * m, int(width) // m * m

    def check_call(
        self,
        num_inference_steps,
        height,
        width,
        output_type,
        num_images_per_prompt,
        max_sequence_length,
        true_cfg_scale,
    ):
        """The arguments that need no model (the steps and sigmas are checked where the schedule is made)."""
        if (
            not isinstance(true_cfg_scale, (int, float))
            or isinstance(true_cfg_scale, bool)
            or not math.isfinite(true_cfg_scale)
            or true_cfg_scale < 0
        ):
            raise ValueError(
                f"true_cfg_scale must be a finite number >= 0 (1 = no guidance), got {true_cfg_scale!r}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        prompts.check_max_sequence_length(max_sequence_length)

    def schedule(self, num_inference_steps, height, width, sigmas=None) -> torch.Tensor:
        """The noise levels to visit, (steps + 1,) on the device, last 0: scheduler.get_schedule at this size's
        number of image tokens (the shift grows with it). A value handed to `denoise`, as flux hands its
        timesteps to its denoise; `sigmas` replaces the default linspace, as in diffusers."""
        tokens = (height // self.size_multiple) * (width // self.size_multiple)
        steps = None if sigmas is not None else num_inference_steps
        return scheduler.get_schedule(self.scheduler.config, steps, tokens, sigmas).to(self.device)

    def prompt_embeddings(
        self,
        prompt,
        negative_prompt,
        true_cfg_scale,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        n,
        max_sequence_length,
        image=None,
    ):
        """-> (embeds, mask), and the same for the negative prompt when CFG runs (else None).
        `image` is passed on to encode_prompt (the Edit pipelines' images or their features)."""
        cond = self.embeddings(
            prompt, prompt_embeds, prompt_embeds_mask, "prompt", n, max_sequence_length, image
        )
        use_cfg = true_cfg_scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if true_cfg_scale > 1 and not use_cfg:
            warnings.warn(
                f"true_cfg_scale={true_cfg_scale} has no effect without a negative_prompt "
                "(the official examples use negative_prompt=' ')",
                stacklevel=3,
            )
        if not use_cfg:
            return cond, None
        if isinstance(negative_prompt, str):  # one negative prompt serves every prompt
            negative_prompt = [negative_prompt] * (len(cond[0]) // n)
        uncond = self.embeddings(
            negative_prompt,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            "negative_prompt",
            n,
            max_sequence_length,
            image,
        )
        if len(uncond[0]) != len(cond[0]):
            raise ValueError(
                f"negative_prompt gives {len(uncond[0])} embeddings but prompt gives "
                f"{len(cond[0])}: pass one negative prompt per prompt (or a single str)"
            )
        return cond, uncond

    def embeddings(self, prompt, embeds, mask, name, n, max_sequence_length, image=None):
        """Prompt text or precomputed embeddings -> (embeds, mask or None); an all-ones mask is dropped."""
        if prompt is not None and embeds is not None:
            raise ValueError(f"pass either {name} or {name}_embeds, not both")
        if prompt is None and embeds is None:
            raise ValueError(f"pass {name} (text) or {name}_embeds")
        if embeds is None:
            texts = [prompt] if isinstance(prompt, str) else prompt  # its types: checked by encode_prompts
            if (
                name == "prompt"
                and isinstance(texts, (list, tuple))
                and any(isinstance(p, str) and not p.strip() for p in texts)
            ):
                raise ValueError(
                    "prompt must not be empty: describe the image (an empty prompt is only "
                    "meaningful as negative_prompt)"
                )
            embeds, mask = self.encode_prompt(prompt, image, n, max_sequence_length)
        else:
            width = self.transformer.config.joint_attention_dim
            if embeds.ndim != 3 or embeds.shape[-1] != width:
                raise ValueError(f"{name}_embeds must be (batch, length, {width}), got {tuple(embeds.shape)}")
            if mask is None and embeds.shape[0] > 1:
                raise ValueError(
                    f"{name}_embeds for a batch needs {name}_embeds_mask (1 = token, 0 = padding): "
                    "without it padding would be attended to"
                )
            if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(
                    f"{name}_embeds_mask must be {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}"
                )
            embeds = embeds[:, :max_sequence_length].repeat_interleave(n, 0)
            mask = None if mask is None else mask[:, :max_sequence_length].repeat_interleave(n, 0)
        embeds = embeds.to(self.device, self.transformer.img_in.weight.dtype)
        if mask is not None:
            mask = mask.to(self.device)
            if bool(mask.all()):
                mask = None  # no padding: plain attention (as diffusers; also faster kernels)
        return embeds, mask

    def prepare_latents(self, latents, batch, height, width, generator) -> torch.Tensor:
        """Packed starting noise (B, N, C * p²): drawn from `generator`, or the given `latents` checked."""
        s, p = self.vae_scale_factor, self.transformer.config.patch_size
        h, w = height // s, width // s  # latent pixels
        channels = self.vae.config.z_dim
        dtype = self.transformer.img_in.weight.dtype
        if latents is None:
            check_generators(generator, batch)
            noise = sampling.initial_noise(
                (batch, 1, channels, h, w), generator, self.device, dtype
            )  # (B, 1, C, h, w)
            return mmdit.pack_latents(noise[:, 0], p)  # (B, N, C p²)
        shape = (batch, (h // p) * (w // p), channels * p * p)
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must be packed noise of shape {shape} for {height}x{width}, "
                f"got {tuple(latents.shape)}"
            )
        return latents.to(self.device, dtype)

    def encode_pixels(self, pixels, generator=None, sample: bool = True) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised, packed latents (B, H/16 * W/16, C p²), in the transformer's dtype.
        sample=True draws from the VAE's posterior with `generator` (one per row when a list), as diffusers'
        image-conditioned pipelines do; sample=False takes its mean."""
        with self.active(self.vae) as ae:
            posterior = ae.encode(pixels.to(self.device, ae.post_quant_conv.weight.dtype))  # (B, C, H/8, W/8)
            z = posterior.mean
            if sample:
                z = z + posterior.std * sampling.initial_noise(z.shape, generator, z.device, z.dtype)
            z = ae.normalize_latents(z)
        return mmdit.pack_latents(z, self.transformer.config.patch_size).to(
            self.transformer.img_in.weight.dtype
        )

    def picture_latents(
        self, picture, width, height, generator, batch, crop=None, fill=False
    ) -> torch.Tensor:
        """PIL picture -> fitted to width x height (images.fit) -> a posterior draw, normalised and packed,
        repeated for the batch: (batch, N, C p²). With a list of generators the draw takes the first, as
        diffusers encodes its one picture with generator[0]."""
        check_generators(generator, batch)  # before the VAE runs
        pixels = images.to_tensor(images.fit(picture, width, height, crop, fill))  # (1, 3, H, W) in [-1, 1]
        first = generator[0] if isinstance(generator, list) else generator
        return self.encode_pixels(pixels, first).expand(batch, -1, -1)

    def denoise(
        self,
        latents,
        cond,
        uncond,
        true_cfg_scale,
        img_shapes,
        sigmas,
        callback_on_step_end=None,
        progress=True,
        reference=None,
        after_step=None,
        control=None,
    ) -> torch.Tensor:
        """sampling.denoise over `sigmas` (from `schedule`), with the transformer on the device.
        after_step(i, x) -> x runs after each Euler step, before the user's callback (inpainting puts the
        known pixels back there); control: sampling.denoise's (the ControlNet pipelines')."""
        on_step = None
        if callback_on_step_end is not None or after_step is not None:
            timesteps = sigmas[:-1] * self.scheduler.config.num_train_timesteps  # t = 1000 sigma, as reported

            def on_step(i, x):
                if after_step is not None:
                    x = after_step(i, x)
                if callback_on_step_end is None:
                    return x
                # diffusers' signature: (pipeline, i, t, {"latents": x})
                out = callback_on_step_end(self, i, timesteps[i], {"latents": x})
                return (out or {}).get("latents", x)

        if self.cfg_parallel and uncond is None:
            raise ValueError(
                "cfg_parallel runs the two CFG passes on two processes: it needs true_cfg_scale > 1 and a "
                "negative_prompt (the official examples use ' ')"
            )
        with self.active(self.transformer) as dit:
            return sampling.denoise(
                parallel.CFGParallel(dit, self.mesh["cfg"]) if self.cfg_parallel else dit,
                latents,
                cond,
                sigmas,
                img_shapes,
                negative_prompt=uncond,
                cfg_scale=true_cfg_scale,
                reference=reference,
                on_step=on_step,
                progress=progress,
                batch_cfg=self.batch_cfg,
                control=control,
                cfg_combine=self.cfg_combine,
                euler_step=self.euler_step,
            )

    def decode(self, latents, height, width, output_type, tiled_vae=False) -> PipelineOutput:
        """Packed latents -> unpack, undo the latent normalisation, VAE decode -> output_type.
        Latents that are not finite stop here with an error, whatever the output type: one check after the
        last step (not a scan per step), so that no run ends with a black picture and success."""
        if not bool(torch.isfinite(latents).all()):
            raise FloatingPointError(
                "the sampled latents hold NaN or Inf after the last step, so the picture would be black: "
                "a LoRA with extreme values or scale, fp16 compute (use bf16 or fp32), or weights loaded with "
                "check_finite=False are the usual causes"
            )
        if output_type == "latent":
            return PipelineOutput(latents)
        s, p = self.vae_scale_factor, self.transformer.config.patch_size
        with self.active(self.vae) as ae:
            z = mmdit.unpack_latents(latents, height // s, width // s, p).to(ae.post_quant_conv.weight.dtype)
            image = ae.decode(ae.denormalize_latents(z), tiled=tiled_vae)  # (B, 3, H, W)
        return PipelineOutput(images.postprocess(image, output_type))

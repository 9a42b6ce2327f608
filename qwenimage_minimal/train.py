"""Fine-tuning Qwen-Image and Qwen-Image-Edit with flow matching: LoRA (default) or the full transformer.

The step is the one of diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py, the recipe
most users start from, without accelerate and PEFT:

    x0     = (z - latents_mean) / latents_std           z drawn from the VAE posterior of the image
    u      ~ the weighting scheme's density              uniform, logit-normal or "mode"
    t      = timesteps[int(u * 1000)], sigma = t / 1000  the training schedule (NOT shifted, see below)
    x      = (1 - sigma) x0 + sigma noise                a point on the straight path
    loss   = w(sigma) * || MMDiT(x, prompt, sigma) - (noise - x0) ||^2   per-sample mean, then batch mean

    u, t, sigma, loss  (B,)     z, x0, noise, x  (B, 16, H/8, W/8)     tokens  (B, H/16 * W/16, 64)

This file holds the step, the optimizer, validation and the loop. The rest is what a trainer needs around
them, in the order the loop uses it, one job per file:

    settings    train_config.py: TrainConfig, the command line and --config; check_config checks each once
    data        train_data.py: a folder of images + same-stem .txt captions, or a .jsonl of {"image", "prompt"}
                (+ "control" images for Edit); aspect-ratio buckets at resolution² pixels, or a square crop
    cache       train_data.py: prompt embeddings and the VAE posterior (mean, logvar) of every image, computed
                once and kept as safetensors keyed by content; then the text encoder leaves memory
    model       LoRA (lora.py) on bf16 weights with fp32 adapters, or every weight (fp32 master weights);
                gradient checkpointing per block; DDP (LoRA) or FSDP2 (full) under torchrun (distributed.py)
    optimise    here: AdamW, gradient accumulation, clipping, warmup then constant / linear / cosine
    save        checkpoints.py: every N steps, all or nothing: the LoRA (diffusers format) or the transformer
                (official layout), plus what resuming needs, bit for bit: trainable weights, optimizer, step
    validate    here: fixed prompts and seed through the pipeline's own steps (prepare_latents, schedule,
                denoise, decode), as diffusers' log_validation calls its pipeline; one grid per validation;
                CFG, steps and negative prompt the model folder's own (pipeline_defaults.json) unless given

Randomness that decides what a step sees (caption dropout, u, noise, the posterior sample, LoRA dropout)
is seeded by (seed, micro-batch number), and the data order by (seed, epoch), so the same micro-batch
gets the same draws whether it runs in one process or two, straight or after a resume.

Facts the reference hides (each checked against diffusers in tests/test_train.py):
- The script loads the scheduler with shift=3.0, but the official config has use_dynamic_shifting=True,
  and then the training sigmas are not shifted at all: sigma = t / 1000, t in 1000, 999, ..., 1.
- It hands the model timesteps / 1000, and noises with the schedule's sigmas: equal up to one rounding.
- "mode" can draw u = 1 exactly (from rand() = 0), whose index 1000 is past the end of the schedule;
  we clamp it to the last entry (sigma = 0.001).
- Current diffusers samples the posterior once, when caching; we cache (mean, logvar) and sample at
  every step (what it did before caching moved), so each epoch sees a fresh sample.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import (
    checkpoints,
    distributed,
    ema,
    images,
    lora,
    mmdit,
    pipeline,
    scheduler,
    train_data,
    weights,
    writing,
)
from .train_config import TrainConfig, check_config, parse_args, with_model_defaults

# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def timestep_density(
    scheme: str,
    batch_size: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """u in [0, 1] (B,), drawn with the density of the weighting scheme (SD3, Esser et al. 2024, sec. 3.1).
    The schedule runs from t = 1000 down, so sigma ~ 1 - u: SD3's density of sigma, mirrored (a positive
    logit_mean means less noise here, as in the reference).
    logit_normal  sigmoid(N(mean, std)): most steps at middle noise levels
    mode          1 - u - s (cos²(pi u / 2) - 1 + u), u uniform: a heavier middle, tails kept (s = 1.29)
    otherwise     uniform"""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch_size,), generator=generator))
    u = torch.rand(batch_size, generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight (SD3's schemes that weight the loss instead of the density):
    sigma_sqrt 1 / sigma², cosmap 2 / (pi (1 - 2 sigma + 2 sigma²)), otherwise 1."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def pick_timesteps(u: torch.Tensor, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """u (B,) -> (timesteps (B,), sigmas (B,)) from the training schedule: index int(u * 1000)."""
    timesteps, sigmas = schedule
    index = (u * len(timesteps)).long().clamp(0, len(timesteps) - 1)  # "mode" can give u = 1 exactly
    return timesteps[index], sigmas[index]


def flow_matching_loss(
    model,
    x0,
    noise,
    u,
    prompt_embeds,
    prompt_mask,
    schedule,
    weighting_scheme: str = "none",
    reference: torch.Tensor | None = None,
    reference_shapes=(),
    prior_loss_weight=None,
):
    """The training loss of one micro-batch, as the reference computes it.

    x0                (B, C, h, w) normalised latents, in the transformer's dtype
    noise             like x0
    u                 (B,) from timestep_density
    prompt_embeds     (B, L, D), prompt_mask (B, L) or None
    schedule          scheduler.training_schedule(...)
    reference         Edit: (B, M, 64) packed condition latents (never noised), with their img_shapes
    prior_loss_weight DreamBooth: the batch is [instances, class images]; loss = instance loss + w * prior loss
    returns           the scalar loss (fp32)"""
    B, C, h, w = x0.shape
    p = distributed.unwrap(model).config.patch_size
    timesteps, sigmas = pick_timesteps(u.to(x0.device), [s.to(x0.device) for s in schedule])
    sigma = sigmas.to(x0.dtype).view(B, 1, 1, 1)
    x = (1 - sigma) * x0 + sigma * noise  # (B, C, h, w) on the straight path
    tokens = mmdit.pack_latents(x, p)  # (B, N, C p²)
    n = tokens.shape[1]
    shapes = [(1, h // p, w // p), *reference_shapes]
    if reference is not None:
        tokens = torch.cat([tokens, reference.to(tokens.dtype)], dim=1)  # (B, N + M, C p²)
    prediction = model(tokens, prompt_embeds, prompt_mask, timesteps / 1000, shapes)[:, :n]  # (B, N, C p²)
    target = mmdit.pack_latents(noise - x0, p)  # velocity noise - x0, packed alike
    weight = loss_weighting(weighting_scheme, sigma.flatten()).view(B, 1, 1)
    per_sample = (weight.float() * (prediction.float() - target.float()) ** 2).reshape(B, -1).mean(1)  # (B,)
    if prior_loss_weight is None:
        return per_sample.mean()
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()


# ---------------------------------------------------------------------------------------------
# One micro-batch: from the cache to the loss's inputs, with its draws
# ---------------------------------------------------------------------------------------------


def make_inputs(
    batch: list[int],
    cache: list,
    class_cache: list,
    c: TrainConfig,
    g: torch.Generator,
    latents_mean,
    latents_std,
    device,
    dtype,
) -> dict:
    """One micro-batch from the cache: draws from `g` in a fixed order (dropout, posterior, noise, u)."""
    entries = [train_data.read_cached(cache[i]) for i in batch]
    dropped = (torch.rand(len(batch), generator=g) < c.caption_dropout).tolist()
    captions = [
        e["empty_embeds"] if drop else e["prompt_embeds"] for e, drop in zip(entries, dropped)
    ]  # (L_i, D)
    if c.with_prior_preservation:  # the batch becomes [instances, class images]; never dropped
        class_entries = [train_data.read_cached(class_cache[i]) for i in batch]
        entries += class_entries
        captions += [e["prompt_embeds"] for e in class_entries]
    mean = torch.stack([e["latent_mean"] for e in entries])  # (B, C, h, w)
    logvar = torch.stack([e["latent_logvar"] for e in entries])  # (B, C, h, w)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(
        mean.shape, generator=g
    )  # posterior sample
    x0 = ((z - latents_mean) / latents_std).to(device, dtype)  # (B, C, h, w) normalised
    noise = torch.randn(x0.shape, generator=g).to(device, dtype)  # (B, C, h, w)
    u = timestep_density(
        c.weighting_scheme, len(entries), c.logit_mean, c.logit_std, c.mode_scale, generator=g
    )
    embeds, mask = train_data.pad_prompts(captions)  # (B, L, D), (B, L) or None
    inputs = {
        "x0": x0,
        "noise": noise,
        "u": u,
        "prompt_embeds": embeds.to(device, dtype),
        "prompt_mask": None if mask is None else mask.to(device),
    }
    if "control_tokens" in entries[0]:
        inputs["reference"] = torch.stack([e["control_tokens"] for e in entries]).to(
            device, dtype
        )  # (B, M, 64)
        inputs["reference_shapes"] = [tuple(s) for s in entries[0]["control_shapes"].tolist()]
    return inputs


def micro_batch_inputs(data: train_data.TrainingData, index: int, c: TrainConfig, device, dtype) -> dict:
    """Micro-batch `index` of the run (numbered over every step and process): its examples, from the data
    order, and its draws, from its own seed."""
    batch = train_data.micro_batch(data.buckets, c.train_batch_size, c.seed, index)
    seed = train_data.micro_batch_seed(c.seed, index)
    torch.manual_seed(seed + 1)  # LoRA dropout draws from the global RNG
    return make_inputs(
        batch,
        data.cache,
        data.class_cache,
        c,
        torch.Generator().manual_seed(seed),
        data.latents_mean,
        data.latents_std,
        device,
        dtype,
    )


# ---------------------------------------------------------------------------------------------
# Optimisation: learning rate, the optimizer, one optimizer step
# ---------------------------------------------------------------------------------------------


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier at optimizer step `step` (diffusers' get_scheduler semantics)."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1 - progress)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))  # cosine, half a period


def make_optimizer(params: list, c: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=c.learning_rate,
        betas=(c.adam_beta1, c.adam_beta2),
        eps=c.adam_epsilon,
        weight_decay=c.adam_weight_decay,
        fused=device.type == "cuda" or None,
    )


def optimizer_step(
    model,
    optimizer,
    data: train_data.TrainingData,
    schedule,
    c: TrainConfig,
    step: int,
    rank: int,
    world: int,
    device,
    dtype,
) -> tuple[float, torch.Tensor]:
    """Optimizer step `step` (from 0): this process's micro-batches forward and backward, the gradients averaged
    across processes, clipped, AdamW. -> (the mean loss of this process's micro-batches, the gradient norm)."""
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:  # the schedule is a function of the step
        group["lr"] = c.learning_rate * lr_factor(c.lr_scheduler, step, c.lr_warmup_steps, c.max_train_steps)
    # Full fine-tuning keeps fp32 master weights; bf16 compute comes from autocast (one process) or
    # from FSDP2's mixed-precision policy (several).
    autocast = torch.autocast(
        device.type, torch.bfloat16, enabled=c.finetune == "full" and world == 1 and dtype == torch.bfloat16
    )
    loss_sum = 0.0
    for j in range(c.gradient_accumulation_steps):
        # Micro-batches are numbered over the whole run: this step's are step * accumulation * world + ...,
        # so one process accumulating 2 sees what 2 processes see, and a resumed run what a straight one saw.
        inputs = micro_batch_inputs(
            data, (step * c.gradient_accumulation_steps + j) * world + rank, c, device, dtype
        )
        last = j == c.gradient_accumulation_steps - 1
        sync = (
            contextlib.nullcontext()
            if last or not isinstance(model, nn.parallel.DistributedDataParallel)
            else model.no_sync()
        )  # average gradients across processes once per step
        with sync:
            with autocast:
                loss = flow_matching_loss(
                    model,
                    **inputs,
                    schedule=schedule,
                    weighting_scheme=c.weighting_scheme,
                    prior_loss_weight=c.prior_loss_weight if c.with_prior_preservation else None,
                )
            (loss / c.gradient_accumulation_steps).backward()
        loss_sum += loss.item() / c.gradient_accumulation_steps
    if not math.isfinite(loss_sum):
        found = checkpoints.checkpoints_in(Path(c.out))
        raise FloatingPointError(
            f"the loss is {loss_sum} at step {step + 1}: training diverged (lower "
            "--learning_rate, keep --max_grad_norm, or use --mixed_precision no to find the cause); "
            + (
                f"the last good checkpoint is {found[-1]}"
                if found
                else f"no checkpoint was saved before it (--checkpointing_steps {c.checkpointing_steps})"
            )
        )
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
    optimizer.step()
    return loss_sum, grad_norm


# ---------------------------------------------------------------------------------------------
# Validation: samples through the pipeline's own steps
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_validation(pipe, model, validation: list, steps: int, cfg: float, seed: int) -> list:
    """Each validation entry {prompt_embeds, negative_embeds, size, control_tokens?, control_shapes?} -> a PIL
    image of the model being trained, through the pipeline's own steps with a fixed seed: what a user of the
    pipeline would get from these weights."""
    pipe.transformer = distributed.unwrap(model)
    dtype = pipe.transformer.img_in.weight.dtype
    was_training = model.training
    model.eval()
    pictures = []
    for entry in validation:
        h, w = entry["size"]
        latents = pipe.prepare_latents(None, 1, h, w, torch.Generator().manual_seed(seed))  # (1, N, 64) noise
        sigmas = pipe.schedule(steps, h, w)  # (steps + 1,)
        img_shapes = [(1, h // pipe.size_multiple, w // pipe.size_multiple)]
        reference = None
        if "control_tokens" in entry:  # Edit
            reference = entry["control_tokens"][None].to(pipe.device, dtype)  # (1, M, 64)
            img_shapes += [tuple(s) for s in entry["control_shapes"].tolist()]
        cond = (entry["prompt_embeds"][None].to(pipe.device, dtype), None)
        uncond = (entry["negative_embeds"][None].to(pipe.device, dtype), None) if cfg > 1 else None
        # With offload (CUDA) the pipeline moves each component to the GPU while it runs, and back to the CPU
        # after: right for the VAE, which waits on the CPU between validations, not for the model being trained.
        offload, pipe.offload = pipe.offload, False
        try:
            x = pipe.denoise(
                latents, cond, uncond, cfg, img_shapes, sigmas, progress=False, reference=reference
            )
        finally:
            pipe.offload = offload
        pictures.append(pipe.decode(x, h, w, "pil").images[0])
    model.train(was_training)
    return pictures


def save_samples(pipe, model, validation: list, c: TrainConfig, png: Path) -> None:
    """The validation prompts sampled now, side by side in the order of --validation_prompt."""
    pictures = sample_validation(
        pipe, model, validation, c.validation_inference_steps, c.validation_cfg, c.seed
    )
    png.parent.mkdir(exist_ok=True)
    images.save_image(images.picture_grid(pictures), png)


# ---------------------------------------------------------------------------------------------
# The loop, and the steps before it
# ---------------------------------------------------------------------------------------------


def startup_summary(
    c: TrainConfig, data: train_data.TrainingData, trainable: dict, device, world: int, step: int
) -> str:
    """What the run is about to do, before its first step: the data, what is trained, where, how long."""
    n = lambda count, word: f"{count:,} {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"
    distinct = dict(zip(data.cache, data.buckets))  # prior preservation repeats instance pictures
    counts = collections.Counter(distinct.values())
    buckets = ", ".join(f"{w}x{h} ({k})" for (h, w), k in sorted(counts.items(), key=lambda kv: -kv[1]))
    classes = f" and {n(len(set(data.class_cache)), 'class picture')}" if data.class_cache else ""
    if c.finetune == "lora":
        what = f"a LoRA (rank {c.rank}, alpha {c.lora_alpha:g}, layers {c.lora_layers})"
        precision = "bf16 weights, fp32 adapters" if c.mixed_precision == "bf16" else "fp32"
    else:
        what = "every transformer weight"
        precision = "fp32 weights, bf16 compute" if c.mixed_precision == "bf16" else "fp32"
    per_step = c.train_batch_size * c.gradient_accumulation_steps * world
    start = f", from step {step}" if step else ""
    parameters = sum(p.numel() for p in trainable.values())
    return (
        f"training {what} of {c.model}: {n(parameters, 'trainable parameter')}\n"
        f"  data: {n(len(distinct), 'picture')}{classes} in {n(len(counts), 'bucket')} (width x height): "
        f"{buckets}\n"
        f"  {device}, {precision} (--mixed_precision {c.mixed_precision}), {n(world, 'process')}; "
        f"{n(c.max_train_steps, 'step')} of {n(per_step, 'picture')}{start}, learning rate "
        f"{c.learning_rate:g} ({c.lr_scheduler}); a checkpoint every {n(c.checkpointing_steps, 'step')} in "
        f"{c.out}"
    )


def prepare_model(c: TrainConfig, root: Path, world: int, device, weight_dtype):
    """The transformer, with what is trained in fp32, wrapped for the processes, and its optimizer.
    -> (model, {name: trained parameter}, optimizer)"""
    if c.finetune == "full" and world > 1:  # built on meta, sharded, each process reading its rows only
        transformer = distributed.load_sharded_transformer(root / "transformer", world, device, weight_dtype)
    else:
        transformer = pipeline.load_transformer(
            root / "transformer", device=device, dtype=weight_dtype if c.finetune == "lora" else torch.float32
        )
    transformer.requires_grad_(False)
    if c.finetune == "lora":
        targets = (
            c.lora_layers
            if c.lora_layers in lora.TARGET_PRESETS
            else [t.strip() for t in c.lora_layers.split(",")]
        )
        lora.add_adapter(
            transformer,
            "default",
            targets,
            c.rank,
            c.lora_alpha,
            c.lora_dropout,
            generator=torch.Generator().manual_seed(c.seed),
        )
        trainable = lora.trainable_parameters(transformer)
    else:
        transformer.requires_grad_(True)
        trainable = dict(transformer.named_parameters())
    for p in trainable.values():
        p.requires_grad_(True)
    transformer.gradient_checkpointing = c.gradient_checkpointing
    transformer.train()
    model = distributed.wrap_for_processes(transformer, c.finetune, world, device, weight_dtype)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], c, device)
    return model, trainable, optimizer


def train(c: TrainConfig, progress: bool = True) -> Path:
    """Run a training; -> the output folder. The steps are numbered below (docs/architecture.md follows them)."""
    class_name = check_config(c)
    c = with_model_defaults(c)  # the validation settings not given: the model folder's own, if it says
    rank, world, device = distributed.setup_distributed(c.device)
    main_process = rank == 0
    progress = progress and main_process
    out, root = Path(c.out), Path(c.model)
    checkpoints.prepare_out(out, bool(c.resume_from_checkpoint), main_process)
    resumed = checkpoints.resume_target(c, out, main_process)  # before any work: is there a step left?
    weight_dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
    if c.validation_prompt and c.finetune == "full" and world > 1:
        # Sampling on one process would wait forever on the others' shards: sample from a checkpoint instead.
        warnings.warn(
            "--validation_prompt is skipped with --finetune full on several processes (FSDP2): "
            "sample from a saved checkpoint's transformer/ instead",
            stacklevel=2,
        )
        c = dataclasses.replace(c, validation_prompt=())
    if c.use_ema and c.finetune == "full" and world > 1:
        raise ValueError(
            "--use_ema keeps the average beside whole weights, and FSDP2 shards them across processes: "
            "use --use_ema with one process, with DDP (--finetune lora), or leave it out"
        )

    # 1. Data and cache (train_data.py); the pipeline stays, without its text encoder, for validation.
    pipe, data, validation = train_data.prepare_cache(
        c, root, "Edit" in class_name, device, weight_dtype, main_process, world, progress
    )
    # 2. The model: the transformer, with what is trained in fp32.
    model, trainable, optimizer = prepare_model(c, root, world, device, weight_dtype)
    # 3. Resume: weights, optimizer moments and the average; the data order and every draw follow from the step.
    average = ema.start(trainable) if c.use_ema else None  # --use_ema: what checkpoints and samples hold
    identity = checkpoints.run_identity(c, world, data.cache)
    step = checkpoints.resume_from_flag(resumed, identity, model, optimizer, trainable, c, average)
    saved = resumed
    if main_process:
        writing.write_json(out / "train_config.json", c.to_json())
        print(startup_summary(c, data, trainable, device, world, step), flush=True)

    # 4. The loop.
    schedule = scheduler.training_schedule(
        scheduler.load(root / "scheduler").config
    )  # (timesteps, sigmas), 1000 each
    log_path = out / "log.jsonl"
    if main_process:
        checkpoints.trim_log(log_path, step)  # keep the log of the steps this run continues from
    bar = tqdm(total=c.max_train_steps, initial=step, desc="training", unit="step", disable=not progress)
    started = time.perf_counter()
    while step < c.max_train_steps:
        loss, grad_norm = optimizer_step(
            model, optimizer, data, schedule, c, step, rank, world, device, weight_dtype
        )
        step += 1
        if average is not None:
            ema.update(average, trainable, step, c.ema_decay)
        if world > 1:
            reduced = torch.tensor([loss], device=device)  # NCCL reduces only GPU tensors
            dist.all_reduce(reduced)
            loss = reduced.item() / world
        if main_process:
            row = {
                "step": step,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "seconds": round(time.perf_counter() - started, 3),
            }
            checkpoints.append_log(log_path, row)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")
            bar.update(1)
        if step % c.checkpointing_steps == 0 or step == c.max_train_steps:
            saved = checkpoints.checkpoint(
                out, step, model, optimizer, trainable, c, identity, main_process, world, average
            )
        if (
            main_process
            and validation
            and ((c.validation_steps and step % c.validation_steps == 0) or step == c.max_train_steps)
        ):
            png = out / "samples" / f"step-{step:06d}.png"
            if step == c.max_train_steps:  # the bar is done; what follows takes a while, and is said
                bar.close()
                prompts = (
                    "validation prompt" if len(validation) == 1 else f"{len(validation)} validation prompts"
                )
                print(
                    f"sampling the {prompts} with the final weights "
                    f"({c.validation_inference_steps} steps, CFG {c.validation_cfg:g}) -> {png}",
                    flush=True,
                )
            bar.set_description("validating")
            with ema.swapped_in(trainable, average):
                save_samples(pipe, model, validation, c, png)
            bar.set_description("training")
    bar.close()
    checkpoints.finish(out, saved, c, model, main_process)  # every process: sharded weights are gathered
    if main_process:
        images.plot_loss(checkpoints.read_log(log_path), out / "loss.png")
        result = out / ("lora.safetensors" if c.finetune == "lora" else "transformer")
        print(f"done: {result} (checkpoints, log.jsonl and loss.png in {out})", flush=True)
    if world > 1:
        dist.barrier()
    return out


def main(argv=None) -> int:
    try:
        train(parse_args(argv))  # its last line says where the result is
    except (ValueError, weights.CheckpointError, OSError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        distributed.leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

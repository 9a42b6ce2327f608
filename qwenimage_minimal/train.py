"""Fine-tuning Qwen-Image and Qwen-Image-Edit with flow matching: LoRA (default) or the full transformer.

The step is the one of diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py, the recipe
most users start from, without accelerate and PEFT:

    x0     = (z - latents_mean) / latents_std           z drawn from the VAE posterior of the image
    u      ~ the weighting scheme's density              uniform, logit-normal or "mode"
    t      = timesteps[int(u * 1000)], sigma = t / 1000  the training schedule (NOT shifted, see below)
    x      = (1 - sigma) x0 + sigma noise                a point on the straight path
    loss   = w(sigma) * || MMDiT(x, prompt, sigma) - (noise - x0) ||^2   per-sample mean, then batch mean

    u, t, sigma, loss  (B,)     z, x0, noise, x  (B, 16, H/8, W/8)     tokens  (B, H/16 * W/16, 64)

The rest is what a trainer needs around it, in the order the loop uses it:

    data        a folder of images + same-stem .txt captions, or a .jsonl of {"image", "prompt"} (+ "control"
                images for Edit); aspect-ratio buckets at resolution² pixels, or a square resize + crop
    cache       prompt embeddings and the VAE posterior (mean, logvar) of every image, computed once and kept
                as safetensors keyed by content; then the text encoder and VAE leave memory
    model       LoRA (lora.py) on bf16 weights with fp32 adapters, or every weight (fp32 master weights);
                gradient checkpointing per block; DDP (LoRA) or FSDP2 (full) under torchrun
    optimise    AdamW, gradient accumulation, clipping, warmup then constant / linear / cosine
    save        every N steps, all or nothing: the LoRA (diffusers format) or the transformer (official layout),
                plus what resuming needs, bit for bit: trainable weights, optimizer, step (safetensors + JSON)
    validate    fixed prompts and seed through sampling.denoise, the function the pipelines use; image grids

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

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import images, lora, mmdit, pipeline, sampling, scheduler, weights

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


# ---------------------------------------------------------------------------------------------
# Settings: one dataclass; the command line and a --config JSON file are built from its fields
# ---------------------------------------------------------------------------------------------

def option(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Flag names follow diffusers' train_dreambooth_lora_qwen_image.py where it has them (its long names for
    --model / --data / --out are accepted too). Defaults differ where Qwen-Image's use differs: resolution 1024
    (the script: 512), batch 1 (4), max_train_steps 1000 (one epoch); --validation_prompt takes several."""
    model: str = option(None, "official Qwen-Image or Qwen-Image-Edit(-2509/-2511) folder", required=True,
                        aliases=("--pretrained_model_name_or_path",))
    data: str = option(None, "a folder of images with same-stem .txt captions, or a .jsonl file", required=True,
                       aliases=("--instance_data_dir",))
    out: str = option(None, "output folder: checkpoints, samples, log, the final LoRA / transformer", required=True,
                      aliases=("--output_dir",))
    # data
    resolution: int = option(1024, "target side in pixels (multiple of 16): images are bucketed at about "
                                   "resolution² pixels, or cropped to a square with --square")
    square: bool = option(False, "resize and center-crop every image to resolution x resolution (no buckets)")
    control_dirs: tuple = option((), "Edit: folders of condition images with the same stems (1 to 3 folders)",
                                nargs="*")
    instance_prompt: str = option(None, "caption for images that have no .txt file (otherwise that is an error)")
    caption_dropout: float = option(0.0, "probability of training a sample on the empty prompt (helps CFG)")
    max_sequence_length: int = option(512, "prompt tokens kept (text-to-image)")
    # prior preservation (DreamBooth)
    with_prior_preservation: bool = option(False, "add the prior loss on class images (DreamBooth)")
    class_data_dir: str = option(None, "folder of class images (prior preservation)")
    class_prompt: str = option(None, "the prompt of every class image (prior preservation)")
    prior_loss_weight: float = option(1.0, "weight of the prior loss")
    # what is trained
    finetune: str = option("lora", "lora, or full (every transformer weight)", choices=("lora", "full"))
    rank: int = option(4, "LoRA rank")
    lora_alpha: float = option(4.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_layers: str = option("diffusers", "LoRA targets: a preset (diffusers, attention, all-linear, "
                                           "all-linear-no-mod) or comma-separated module suffixes")
    mixed_precision: str = option("bf16", "bf16: frozen weights in bf16, trained ones in fp32; no: all fp32",
                                  choices=("bf16", "no"))
    gradient_checkpointing: bool = option(False, "recompute each block in backward (much less memory, ~30% slower)")
    # optimisation
    learning_rate: float = option(1e-4, "peak learning rate")
    lr_scheduler: str = option("constant", "constant (no warmup, as diffusers), constant_with_warmup, linear, "
                                           "cosine", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "linear warmup steps (not used by 'constant')")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    train_batch_size: int = option(1, "images per micro-batch per process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_train_steps: int = option(1000, "optimizer steps")
    weighting_scheme: str = option("none", "timestep density / loss weighting (SD3)", choices=WEIGHTING_SCHEMES)
    logit_mean: float = option(0.0, "logit_normal: mean of logit(u); sigma ~ 1 - u here, so a positive mean "
                                    "means LESS noise (as in diffusers' script)")
    logit_std: float = option(1.0, "logit_normal: standard deviation")
    mode_scale: float = option(1.29, "mode: scale")
    seed: int = option(0, "seed of data order, initialisation and every draw")
    # saving, resuming, validating
    checkpointing_steps: int = option(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int = option(None, "keep at most this many checkpoints (oldest removed)")
    resume_from_checkpoint: str = option(None, "a checkpoint folder, or 'latest' (in --out)")
    validation_prompt: tuple = option((), "prompt(s) sampled every --validation_steps", nargs="*")
    validation_image: tuple = option((), "Edit: condition image(s) for the validation prompts", nargs="*")
    validation_steps: int = option(0, "sample the validation prompts every N steps (0: only at the end)")
    validation_inference_steps: int = option(20, "sampling steps for validation")
    validation_cfg: float = option(4.0, "true CFG scale for validation (1: off)")
    embeddings_cache: str = option(None, "folder of the cached latents and prompt embeddings (default: <out>/cache; "
                                         "diffusers' --cache_dir is its download cache, a different thing)")
    device: str = option(None, "cuda or cpu (default: cuda when available)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig. --config FILE.json gives defaults; flags override it."""
    p = argparse.ArgumentParser(prog="python -m qwenimage_minimal train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a JSON file of settings (keys: the flag names); flags override it")
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text, required = meta.pop("help"), meta.pop("required", False)
        names = (f"--{f.name}", *meta.pop("aliases", ()))
        if f.type == "bool":
            p.add_argument(*names, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(*names, dest=f.name, type=kind, default=None, help=help_text + ("" if required else
                           f" (default: {f.default})"), **meta)
    args = p.parse_args(argv)
    settings = {}
    if args.config:
        settings.update(read_config_file(args.config))
    settings.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    missing = [n for n in ("model", "data", "out") if settings.get(n) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")
    return TrainConfig(**settings)


def read_config_file(path) -> dict:
    """--config FILE.json: a JSON object whose keys are flag names, each value of the flag's type (a list, or
    one string, for the flags that take several)."""
    raw = weights.parse_json(Path(path).read_text(), path)
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"--config {path}: unknown keys: {unknown} (the keys are the flag names, e.g. 'rank')")
    out = {}
    for key, value in raw.items():
        kind = fields[key]
        if kind == "tuple" and isinstance(value, str):
            value = (value,)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "tuple": isinstance(value, list) and all(isinstance(v, str) for v in value) or isinstance(value, tuple),
              }.get(kind, isinstance(value, str)) or value is None
        if not ok:
            raise ValueError(f"--config {path}: {key!r} must be {'a list of strings' if kind == 'tuple' else kind}, "
                             f"got {value!r}")
        out[key] = tuple(value) if kind == "tuple" else value
    return out


def check_config(c: TrainConfig) -> None:
    """Every setting, once, before anything loads: a clear error that names the flag."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)
    need(isinstance(c.resolution, int) and c.resolution >= 16 and c.resolution % 16 == 0,
         f"--resolution {c.resolution}: must be a multiple of 16 (one latent token covers 16x16 pixels), "
         f"e.g. {max(16, round(c.resolution / 16) * 16) if isinstance(c.resolution, (int, float)) else 1024}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank",
                 "checkpointing_steps", "validation_inference_steps"):
        value = getattr(c, name)
        need(isinstance(value, int) and value >= 1, f"--{name} must be a positive integer, got {value!r}")
    for name in ("lr_warmup_steps", "validation_steps"):
        need(isinstance(getattr(c, name), int) and getattr(c, name) >= 0, f"--{name} must be an integer >= 0")
    need(c.checkpoints_total_limit is None or c.checkpoints_total_limit >= 1, "--checkpoints_total_limit must be >= 1")
    for name in ("caption_dropout", "lora_dropout"):
        need(0 <= getattr(c, name) < 1, f"--{name} must be in [0, 1), got {getattr(c, name)}")
    need(c.learning_rate > 0 and math.isfinite(c.learning_rate), f"--learning_rate must be > 0, got {c.learning_rate}")
    need(c.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0: no clipping), got {c.max_grad_norm}")
    need(c.lora_alpha > 0, f"--lora_alpha must be > 0, got {c.lora_alpha}")
    need(c.weighting_scheme in WEIGHTING_SCHEMES, f"--weighting_scheme must be one of {WEIGHTING_SCHEMES}")
    need(c.lr_scheduler in LR_SCHEDULERS, f"--lr_scheduler must be one of {LR_SCHEDULERS}")
    need(c.logit_std > 0, f"--logit_std must be > 0, got {c.logit_std}")
    need(c.finetune in ("lora", "full"), f"--finetune must be lora or full, got {c.finetune!r}")
    need(c.mixed_precision in ("bf16", "no"), f"--mixed_precision must be bf16 or no (fp16 overflows in this "
                                               f"model's activations), got {c.mixed_precision!r}")
    need(len(c.control_dirs) <= 3, f"--control_dirs: at most 3 condition folders, got {len(c.control_dirs)}")
    need(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, "--adam_beta1 and --adam_beta2 must be in [0, 1)")
    need(c.adam_epsilon > 0 and c.adam_weight_decay >= 0, "--adam_epsilon must be > 0 and --adam_weight_decay >= 0")
    need(c.lora_layers in lora.TARGET_PRESETS or all(t.strip() for t in c.lora_layers.split(",")),
         f"--lora_layers {c.lora_layers!r}: a preset ({', '.join(lora.TARGET_PRESETS)}) or comma-separated "
         "module suffixes such as to_q,to_k,to_v,to_out.0")
    need(c.validation_cfg >= 1 and math.isfinite(c.validation_cfg), "--validation_cfg must be >= 1 (1: no CFG)")
    if c.resume_from_checkpoint not in (None, "latest"):
        need(Path(c.resume_from_checkpoint).is_dir(), f"--resume_from_checkpoint {c.resume_from_checkpoint}: no such "
             "folder (give a checkpoint-N folder, or 'latest')")
    if c.with_prior_preservation:
        need(c.class_data_dir and c.class_prompt, "--with_prior_preservation needs --class_data_dir and --class_prompt")
        need(not c.control_dirs, "--with_prior_preservation is for text-to-image (DreamBooth), not Edit")
    if not Path(c.model).is_dir():
        raise ValueError(f"--model {c.model}: no such folder (expected an official Qwen-Image folder)")
    if not Path(c.data).exists():
        raise ValueError(f"--data {c.data}: no such folder or file")


# ---------------------------------------------------------------------------------------------
# Data: examples, buckets, pixels
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    image: Path                           # the target image
    prompt: str
    controls: tuple = ()                  # Edit: condition image paths, in order


def read_examples(data, control_dirs=(), instance_prompt: str | None = None, flag: str = "--data") -> list[Example]:
    """A folder of images + same-stem .txt captions (kohya / ai-toolkit / DreamBooth convention), or a
    .jsonl file of {"image": path, "prompt": str, "control": path or [paths]} (paths relative to the file).

    Rule for an image without a caption: --instance_prompt if given, else an error that names it."""
    data = Path(data)
    if data.is_file():
        if data.suffix != ".jsonl":
            raise ValueError(f"{flag} {data}: expected a folder of images and captions, or a .jsonl file")
        if control_dirs:
            raise ValueError("--control_dirs is for a folder of images; in a .jsonl, name each example's "
                             'condition images in its "control" entry')
        return _read_jsonl(data)
    if not data.is_dir():
        raise ValueError(f"{flag} {data}: no such folder or file")
    if not os.access(data, os.R_OK | os.X_OK):
        raise ValueError(f"{flag} {data}: the folder cannot be read (permissions)")
    for d in control_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"--control_dirs {d}: no such folder")
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{flag} {data}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    examples = []
    for path in files:
        caption = path.with_suffix(".txt")
        if caption.is_file():
            try:
                prompt = caption.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{flag}: the caption {caption} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                 "save it as UTF-8") from None
        elif instance_prompt is not None:
            prompt = instance_prompt
        else:
            raise ValueError(f"{flag}: {path.name} has no caption file {caption.name}; write one, or pass "
                             "--instance_prompt to use one prompt for every uncaptioned image")
        controls = tuple(_same_stem(Path(d), path.stem, f"--control_dirs {d}") for d in control_dirs)
        examples.append(Example(path, prompt, controls))
    return examples


def _same_stem(folder: Path, stem: str, what: str) -> Path:
    found = [p for p in sorted(folder.glob(f"{stem}.*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise ValueError(f"{what}: no image named {stem}.* (every training image needs its condition image)")
    return found[0]


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {path}, line {n}"
        row = weights.parse_json(line, where)
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{where}: expected {{"image": "file.png", "prompt": "..."}}, got {line[:80]!r}')
        controls = row.get("control", row.get("edit_image", []))
        controls = [controls] if isinstance(controls, str) else controls
        if not isinstance(controls, list) or not all(isinstance(c, str) for c in controls) or len(controls) > 3:
            raise ValueError(f'{where}: "control" must be a path or a list of 1 to 3 paths')
        examples.append(Example(path.parent / row["image"], row["prompt"].strip(),
                                tuple(path.parent / c for c in controls)))
    if not examples:
        raise ValueError(f"--data {path}: no examples in this file")
    if len({len(e.controls) for e in examples}) > 1:
        raise ValueError(f"--data {path}: every example needs the same number of condition images")
    return examples


ASPECT_RATIOS = (1 / 3, 9 / 21, 1 / 2, 9 / 16, 2 / 3, 3 / 4, 4 / 5, 1, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2, 21 / 9, 3)


def bucket_size(width: int, height: int, resolution: int, square: bool = False) -> tuple[int, int]:
    """(height, width) to train an image at: the nearest aspect ratio of a fixed ladder (width / height,
    ASPECT_RATIOS) at about side² pixels, sides multiples of 16, so that images share buckets and batches
    stay full. side = resolution, or less for a smaller image (rounded down to a multiple of 64): small
    images are not upscaled (as in diffusers and ai-toolkit). square=True: resolution x resolution."""
    if square:
        return resolution, resolution
    side = min(resolution, max(64, int(math.sqrt(width * height)) // 64 * 64))
    ratio = min(ASPECT_RATIOS, key=lambda r: abs(math.log(r * height / width)))
    w = max(16, round(side * math.sqrt(ratio) / 16) * 16)
    h = max(16, round(side / math.sqrt(ratio) / 16) * 16)
    return h, w


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header alone (as open_image will turn it: EXIF orientations 5-8
    swap the sides); the pixels are read once, when the cache is filled."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path}: not an image PIL can read ({e}); fix or remove it") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_pixels(path: Path, size: tuple[int, int], what: str = "image") -> torch.Tensor:
    """Image file -> (1, 3, h, w) in [-1, 1]: resized to cover `size` (aspect kept), center crop."""
    from PIL import Image
    try:
        image = images.to_rgb(images.open_image(path, name=what), name=what)
        image.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: cannot be read ({e}); fix or remove it") from None
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return images.to_tensor(image.crop((left, top, left + w, top + h)))


@functools.lru_cache(maxsize=4)                       # micro_batch asks for the same epoch at every step
def epoch_batches(buckets: tuple, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices): shuffled within each bucket, cut into
    batches (the last of a bucket may be short), the batches shuffled. A pure function of (seed, epoch):
    the data order is never state to save."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_bucket = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(i)
    batches = []
    for key in sorted(by_bucket):
        members = by_bucket[key]
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        batches += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def micro_batch(buckets: tuple, batch_size: int, seed: int, index: int) -> list[int]:
    """The index-th micro-batch of the whole run (epochs laid end to end)."""
    per_epoch = len(epoch_batches(buckets, batch_size, 0, seed))
    return epoch_batches(buckets, batch_size, index // per_epoch, seed)[index % per_epoch]


def micro_batch_seed(seed: int, index: int) -> int:
    """The seed of micro-batch `index`'s draws (and of the global RNG that LoRA dropout uses): the same
    draws in any process layout and after a resume, so there is no RNG state to save."""
    return (seed * 2_654_435_761 + index * 40_503 + 1) % 2**63


# ---------------------------------------------------------------------------------------------
# The cache: what the frozen text encoder and VAE compute, once
# ---------------------------------------------------------------------------------------------

def model_fingerprint(root: Path) -> str:
    """What the cache depends on in the model: the JSON files of the text encoder, VAE, processor and
    tokenizer (their content) and the names and sizes of their other files. Reading 16 GB of weights at
    every start to hash them would cost minutes; a same-size edit of a weight file goes unnoticed."""
    h = hashlib.sha256()
    for sub in ("model_index.json", "text_encoder", "vae", "processor", "tokenizer"):
        path = root / sub
        for f in sorted([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            if f.is_file():
                h.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(model_id: str, kind: str, example: Example, size, max_sequence_length: int, with_empty: bool) -> str:
    parts = [model_id, kind, file_digest(example.image), example.prompt, str(tuple(size)), str(max_sequence_length),
             str(with_empty)] + [file_digest(c) for c in example.controls]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def encode_examples(pipe, examples: list[Example], sizes: list, with_empty: bool, max_sequence_length: int,
                    batch_size: int) -> list[dict]:
    """Examples -> one dict of tensors each (all on the CPU, fp32):
    latent_mean, latent_logvar (C, h, w)      the VAE posterior of the image (unnormalised)
    prompt_embeds (L, D)                      its caption, without padding
    empty_embeds (L0, D)                      the empty prompt (with the same images, for Edit), if asked
    control_tokens (M, 64), control_shapes    Edit: the condition images' normalised, packed latents
    Images of the same size go through the VAE together, `batch_size` at a time."""
    edit = isinstance(pipe, pipeline.QwenImageEditPipeline)
    out = [dict() for _ in examples]
    vae_dtype = pipe.vae.post_quant_conv.weight.dtype
    by_size = {}
    for i, s in enumerate(sizes):
        by_size.setdefault(tuple(s), []).append(i)
    for size, members in by_size.items():
        for k in range(0, len(members), batch_size):
            chunk = members[k:k + batch_size]
            pixels = torch.cat([load_pixels(examples[i].image, size) for i in chunk])      # (b, 3, H, W)
            with pipe.active(pipe.vae) as ae, torch.no_grad():
                posterior = ae.encode(pixels.to(pipe.device, vae_dtype))    # N(mean, exp(logvar)), (b, C, h, w) each
            for j, i in enumerate(chunk):
                out[i]["latent_mean"] = posterior.mean[j].float().cpu()
                out[i]["latent_logvar"] = posterior.logvar[j].float().cpu()
            if not edit:
                prompts_ = [examples[i].prompt for i in chunk]
                embeds, mask = pipe.encode_prompt(prompts_, max_sequence_length=max_sequence_length)
                for j, i in enumerate(chunk):
                    out[i]["prompt_embeds"] = embeds[j, : int(mask[j].sum())].float().cpu()
    if not edit:
        if with_empty:
            empty, _ = pipe.encode_prompt([""], max_sequence_length=max_sequence_length)
            for entry in out:
                entry["empty_embeds"] = empty[0].float().cpu()
        return out
    for i, e in enumerate(examples):                       # Edit: each prompt is read with its own images
        h, w = sizes[i]
        condition, vae_images = condition_images(pipe, e.controls, (h, w))
        features = pipe.image_features(condition)
        out[i]["prompt_embeds"] = pipe.encode_prompt(e.prompt, features)[0][0].float().cpu()
        if with_empty:
            out[i]["empty_embeds"] = pipe.encode_prompt("", features)[0][0].float().cpu()
        tokens, shapes = pipe.encode_image_latents(vae_images)
        out[i]["control_tokens"] = tokens[0].float().cpu()
        out[i]["control_shapes"] = torch.tensor(shapes, dtype=torch.int64)
    return out


def condition_images(pipe, paths, size):
    """Edit: condition image files -> (images for the vision tower, images for the VAE). The VAE sees each
    condition image at the target's training size (so a batch shares shapes); the vision tower sees it
    as the pipeline would (Edit: the same image; Edit-2509+: about 384x384)."""
    h, w = size
    vae_images = [images.postprocess(load_pixels(p, (h, w), "control image"), "pil")[0] for p in paths]
    if pipe.condition_area is None:
        return vae_images, vae_images
    return [images.resize_to_area(img, pipe.condition_area) for img in vae_images], vae_images


def build_cache(pipe, examples, sizes, cache_dir: Path, kind: str, with_empty: bool, max_sequence_length: int,
                batch_size: int, model_id: str, progress: bool = True) -> list[Path]:
    """The cache file of every example, computing the missing ones (in batches) and writing each
    atomically, so an interrupted run loses nothing it finished and leaves nothing half-written."""
    keys = [cache_key(model_id, kind, e, s, max_sequence_length, with_empty) for e, s in zip(examples, sizes)]
    paths = [cache_dir / f"{k}.safetensors" for k in keys]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        from tqdm.auto import tqdm
        for start in tqdm(range(0, len(todo), 16 * batch_size), desc=f"caching {kind}", disable=not progress):
            chunk = todo[start:start + 16 * batch_size]
            entries = encode_examples(pipe, [examples[i] for i in chunk], [sizes[i] for i in chunk], with_empty,
                                      max_sequence_length, batch_size)
            for i, entry in zip(chunk, entries):
                names = sorted(entry)
                weights.write_safetensors(paths[i], [(n, tuple(entry[n].shape), entry[n].dtype) for n in names],
                                          [entry[n] for n in names], metadata={"image": str(examples[i].image)})
    return paths


def read_cached(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def pad_prompts(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[(L_i, D)] -> (B, max L, D) zero-padded, and the (B, max L) mask; None when nothing is padded
    (as diffusers' concat_prompt_embedding_batches)."""
    longest = max(e.shape[0] for e in embeds)
    out = torch.zeros(len(embeds), longest, embeds[0].shape[1], dtype=embeds[0].dtype)
    mask = torch.zeros(len(embeds), longest, dtype=torch.int64)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]], mask[i, : e.shape[0]] = e, 1
    return out, (None if bool(mask.all()) else mask)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def timestep_density(scheme: str, batch_size: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29, generator: torch.Generator | None = None) -> torch.Tensor:
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
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def pick_timesteps(u: torch.Tensor, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """u (B,) -> (timesteps (B,), sigmas (B,)) from the training schedule: index int(u * 1000)."""
    timesteps, sigmas = schedule
    index = (u * len(timesteps)).long().clamp(0, len(timesteps) - 1)    # "mode" can give u = 1 exactly
    return timesteps[index], sigmas[index]


def flow_matching_loss(model, x0, noise, u, prompt_embeds, prompt_mask, schedule, weighting_scheme: str = "none",
                       reference: torch.Tensor | None = None, reference_shapes=(), prior_loss_weight=None):
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
    p = unwrap(model).config.patch_size
    timesteps, sigmas = pick_timesteps(u.to(x0.device), [s.to(x0.device) for s in schedule])
    sigma = sigmas.to(x0.dtype).view(B, 1, 1, 1)
    x = (1 - sigma) * x0 + sigma * noise                                     # (B, C, h, w) on the straight path
    tokens = mmdit.pack_latents(x, p)                                        # (B, N, C p²)
    n = tokens.shape[1]
    shapes = [(1, h // p, w // p), *reference_shapes]
    if reference is not None:
        tokens = torch.cat([tokens, reference.to(tokens.dtype)], dim=1)      # (B, N + M, C p²)
    prediction = model(tokens, prompt_embeds, prompt_mask, timesteps / 1000, shapes)[:, :n]   # (B, N, C p²)
    target = mmdit.pack_latents(noise - x0, p)                    # velocity noise - x0, packed alike
    weight = loss_weighting(weighting_scheme, sigma.flatten()).view(B, 1, 1)
    per_sample = (weight.float() * (prediction.float() - target.float()) ** 2).reshape(B, -1).mean(1)   # (B,)
    if prior_loss_weight is None:
        return per_sample.mean()
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()


def vae_stats(root: Path):
    raw = weights.read_config(root / "vae")
    from .vae import LATENTS_MEAN, LATENTS_STD
    return raw.get("latents_mean", LATENTS_MEAN), raw.get("latents_std", LATENTS_STD)


def make_inputs(batch: list[int], cache: list, class_cache: list, c: TrainConfig, g: torch.Generator,
                latents_mean, latents_std, device, dtype) -> dict:
    """One micro-batch from the cache: draws from `g` in a fixed order (dropout, posterior, noise, u)."""
    entries = [read_cached(cache[i]) for i in batch]
    dropped = (torch.rand(len(batch), generator=g) < c.caption_dropout).tolist()
    captions = [e["empty_embeds"] if drop else e["prompt_embeds"] for e, drop in zip(entries, dropped)]  # (L_i, D)
    if c.with_prior_preservation:                    # the batch becomes [instances, class images]; never dropped
        class_entries = [read_cached(class_cache[i]) for i in batch]
        entries += class_entries
        captions += [e["prompt_embeds"] for e in class_entries]
    mean = torch.stack([e["latent_mean"] for e in entries])                        # (B, C, h, w)
    logvar = torch.stack([e["latent_logvar"] for e in entries])                    # (B, C, h, w)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=g)  # posterior sample
    x0 = ((z - latents_mean) / latents_std).to(device, dtype)                      # (B, C, h, w) normalised
    noise = torch.randn(x0.shape, generator=g).to(device, dtype)                   # (B, C, h, w)
    u = timestep_density(c.weighting_scheme, len(entries), c.logit_mean, c.logit_std, c.mode_scale, generator=g)
    embeds, mask = pad_prompts(captions)                                           # (B, L, D), (B, L) or None
    inputs = {"x0": x0, "noise": noise, "u": u, "prompt_embeds": embeds.to(device, dtype),
              "prompt_mask": None if mask is None else mask.to(device)}
    if "control_tokens" in entries[0]:
        inputs["reference"] = torch.stack([e["control_tokens"] for e in entries]).to(device, dtype)  # (B, M, 64)
        inputs["reference_shapes"] = [tuple(s) for s in entries[0]["control_shapes"].tolist()]
    return inputs


# ---------------------------------------------------------------------------------------------
# Optimisation: learning rate and the optimizer
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
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))                # cosine, half a period


def make_optimizer(params: list, c: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
                             weight_decay=c.adam_weight_decay, fused=device.type == "cuda" or None)


# ---------------------------------------------------------------------------------------------
# Several processes: torchrun, DDP, FSDP2
# ---------------------------------------------------------------------------------------------

def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """Under torchrun (RANK / WORLD_SIZE set): join the process group, gloo on CPU and NCCL on GPUs."""
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        # Rank 0 fills the cache (and gathers full checkpoints) while the others wait at a barrier: allow hours.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_for_processes(transformer: nn.Module, c: TrainConfig, world: int, device, weight_dtype) -> nn.Module:
    """One process: the model itself. Several: DDP for LoRA (every process holds the frozen weights, the
    adapters' gradients are averaged), FSDP2 for full fine-tuning (each block's weights, gradients and
    AdamW moments sharded across processes; fully_shard per block, then the root)."""
    if world == 1:
        return transformer
    if c.finetune == "lora":
        # static_graph: the same adapters get no gradient at every step (the last block's text-stream output
        # is never used), which DDP must be told about.
        return nn.parallel.DistributedDataParallel(transformer, device_ids=[device] if device.type == "cuda" else None,
                                                   static_graph=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=weight_dtype, reduce_dtype=torch.float32)
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    return transformer


def full_states(model, optimizer, c: TrainConfig, world: int) -> tuple[dict | None, dict]:
    """(full model state for saving, optimizer state keyed by parameter name), gathered to every process
    when sharded (torch.distributed.checkpoint's state-dict API: it also works in one process)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=world > 1)
    inner = unwrap(model)
    optim = get_optimizer_state_dict(inner, optimizer, options=options)
    model_state = None
    if c.finetune == "full":
        model_state = {k: v.detach().cpu() for k, v in get_model_state_dict(inner, options=options).items()}
    return model_state, optim


# ---------------------------------------------------------------------------------------------
# Checkpoints: all or nothing, safetensors + JSON
# ---------------------------------------------------------------------------------------------

RUN_FIELDS = ("model", "data", "finetune", "rank", "lora_alpha", "lora_layers", "resolution", "square", "seed",
              "train_batch_size", "gradient_accumulation_steps", "with_prior_preservation", "caption_dropout",
              "weighting_scheme", "mixed_precision")


def run_identity(c: TrainConfig, world: int, examples_digest: str) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    identity = {k: getattr(c, k) for k in RUN_FIELDS}
    identity.update(model=str(Path(c.model).resolve()), data=str(Path(c.data).resolve()), world_size=world,
                    examples=examples_digest)
    return identity


def write_transformer_folder(folder: Path, state: dict, config: mmdit.MMDiTConfig, max_shard_bytes: int = 5 << 30):
    """The official transformer/ layout: config.json + diffusion_pytorch_model(-0000i-of-0000n).safetensors
    (+ index when sharded), as diffusers' save_pretrained writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name, t in state.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += t.nbytes
    shards.append(current)
    stem = mmdit.WEIGHTS_STEM
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        weights.write_safetensors(folder / file, [(n, tuple(state[n].shape), state[n].dtype) for n in names],
                                  [state[n] for n in names])
        weight_map.update({n: file for n in names})
    if len(shards) > 1:
        weights.write_json(folder / f"{stem}.safetensors.index.json",
                           {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                            "weight_map": weight_map})
    weights.write_json(folder / "config.json", config.to_json())


def save_checkpoint(out: Path, step: int, model: nn.Module, c: TrainConfig, identity: dict,
                    trainable: dict, full_state: dict | None, optim_state: dict) -> Path:
    """out/checkpoint-<step>/, written in a hidden staging folder and renamed into place: a crash leaves
    either the previous checkpoints or the new one complete, never a half-written one.

    lora.safetensors          the adapter, diffusers format (loads in the pipelines, --lora, diffusers)
    transformer/              full fine-tuning: the transformer, official layout (fp32 master weights)
    training_state.safetensors  trainable weights as trained (LoRA), AdamW moments (no RNG state: every
                              draw is seeded by (seed, micro-batch), see micro_batch_seed)
    trainer_state.json        step, optimizer hyperparameters, the run's identity"""
    final = out / f"checkpoint-{step}"
    staging = out / f".checkpoint-{step}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tensors = {}
        if c.finetune == "lora":
            lora.write_lora(staging / "lora.safetensors", lora.adapter_state(unwrap(model), "default"))
            tensors.update({f"param.{n}": p.detach().float().cpu() for n, p in trainable.items()})
        else:
            write_transformer_folder(staging / "transformer", full_state, model_config(model))
        for name, entry in optim_state["state"].items():
            for key, value in entry.items():
                tensors[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().cpu()
        names = sorted(tensors)
        weights.write_safetensors(staging / "training_state.safetensors",
                                  [(n, tuple(tensors[n].shape), tensors[n].dtype) for n in names],
                                  [tensors[n] for n in names])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
        weights.write_json(staging / "trainer_state.json", {"step": step, "param_groups": groups, "run": identity})
        old = out / f".checkpoint-{step}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def checkpoint(out, step, model, optimizer, trainable, c, identity, main_process, world) -> Path:
    """Gather the states (every process takes part), save on the main process; -> the checkpoint's path."""
    model_state, optim = full_states(model, optimizer, c, world)
    if main_process:
        save_checkpoint(out, step, model, c, identity, trainable, model_state, optim)
        if c.checkpoints_total_limit:
            for old in checkpoints_in(out)[:-c.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return out / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int:
    tail = path.name.split("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else -1


def checkpoints_in(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (staging folders are hidden: .checkpoint-*)."""
    return sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def read_checkpoint(path: Path, identity: dict) -> tuple[int, dict, dict]:
    """-> (step, trainer_state, tensors), after checking the checkpoint belongs to this run."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file() or not (path / "training_state.safetensors").is_file():
        raise ValueError(f"--resume_from_checkpoint {path}: not a checkpoint of this trainer "
                         "(trainer_state.json and training_state.safetensors are missing)")
    state = weights.parse_json(state_file.read_text(), state_file)
    saved = state.get("run", {})
    differ = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if differ:
        lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"--resume_from_checkpoint {path}: the checkpoint is from another run ({lines}); "
                         "resume with the settings it was trained with, or start a new --out")
    return int(state["step"]), state, read_cached(path / "training_state.safetensors")


def resume(path: Path, identity: dict, model, optimizer, trainable: dict, c: TrainConfig) -> int:
    """Load a checkpoint into the model and optimizer; -> its step."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    step, state, tensors = read_checkpoint(path, identity)
    inner = unwrap(model)
    options = StateDictOptions(full_state_dict=True, strict=False)   # a weight that never had a gradient has no state
    if c.finetune == "lora":
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(tensors[f"param.{n}"])
    else:
        loaded = mmdit.load(path / "transformer", device="cpu", dtype=torch.float32)
        set_model_state_dict(inner, loaded.state_dict(), options=options)
    template = get_optimizer_state_dict(inner, optimizer, options=options)
    optim = {"state": {}, "param_groups": template["param_groups"]}
    for key, t in tensors.items():
        if key.startswith("optim."):
            name, field_ = key[len("optim."):].rsplit(".", 1)
            optim["state"].setdefault(name, {})[field_] = t
    # The optimizer's hyperparameters are this run's flags (identical, for an exact resume); the learning rate
    # is set from the step before every update.
    set_optimizer_state_dict(inner, optimizer, optim, options=options)
    for name, p in inner.named_parameters():      # it fills in zero state for weights that never had a gradient:
        if name not in optim["state"]:            # drop it, so the optimizer is exactly the saved one
            optimizer.state.pop(p, None)
    return step


def finish(out: Path, last: Path, c: TrainConfig) -> None:
    """The final result beside the checkpoints, from the last one saved: lora.safetensors, or transformer/."""
    if c.finetune == "lora":
        shutil.copyfile(last / "lora.safetensors", out / ".lora.safetensors.partial")
        os.replace(out / ".lora.safetensors.partial", out / "lora.safetensors")
    else:
        staging = out / ".transformer.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(last / "transformer", staging)
        shutil.rmtree(out / "transformer", ignore_errors=True)
        os.replace(staging, out / "transformer")


def model_config(model: nn.Module) -> mmdit.MMDiTConfig:
    return unwrap(model).config


def read_log(path: Path) -> list[dict]:
    """The rows of log.jsonl; a last line cut short by a killed process is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and "step" in r and "loss" in r]


# ---------------------------------------------------------------------------------------------
# Validation and the log
# ---------------------------------------------------------------------------------------------

def validation_entries(c: TrainConfig, pipe, edit: bool) -> list[dict]:
    """The validation prompts' embeddings (and Edit's condition latents), computed while the text
    encoder is loaded, at --resolution (Edit: the condition image's bucket)."""
    entries = []
    controls = [Path(p) for p in c.validation_image]                  # checked in train(): one per prompt
    for i, prompt in enumerate(c.validation_prompt):
        if not edit:
            embeds, mask = pipe.encode_prompt(prompt, max_sequence_length=c.max_sequence_length)
            negative, _ = pipe.encode_prompt(" ", max_sequence_length=c.max_sequence_length)
            entries.append({"prompt_embeds": embeds[0].float().cpu(), "negative_embeds": negative[0].float().cpu(),
                            "size": (c.resolution, c.resolution)})
            continue
        size = bucket_size(*image_size(controls[i]), c.resolution, c.square)
        condition, vae_images = condition_images(pipe, [controls[i]], size)
        features = pipe.image_features(condition)
        tokens, shapes = pipe.encode_image_latents(vae_images)
        entries.append({"prompt_embeds": pipe.encode_prompt(prompt, features)[0][0].float().cpu(),
                        "negative_embeds": pipe.encode_prompt(" ", features)[0][0].float().cpu(), "size": size,
                        "control_tokens": tokens[0].float().cpu(), "control_shapes": torch.tensor(shapes)})
    return entries


@torch.no_grad()
def sample_validation(model, vae, validation: list, scheduler_config, steps: int, cfg: float, seed: int,
                      device) -> list:
    """Each validation entry {prompt_embeds, negative_embeds, size, control_tokens?, control_shapes?} -> a PIL
    image, through sampling.denoise with a fixed seed: the same function the pipelines sample with."""
    config = unwrap(model).config
    p, out = config.patch_size, []
    dtype = unwrap(model).img_in.weight.dtype
    was_training = model.training
    model.eval()
    for entry in validation:
        h, w = entry["size"]
        lh, lw = h // vae.config.scale_factor, w // vae.config.scale_factor
        noise = sampling.initial_noise((1, config.latent_channels, lh, lw), torch.Generator().manual_seed(seed),
                                       device, dtype)
        x = mmdit.pack_latents(noise, p)                                               # (1, N, 64)
        sigmas = scheduler.get_schedule(scheduler_config, steps, x.shape[1])
        shapes = [(1, lh // p, lw // p)]
        reference = None
        if "control_tokens" in entry:
            reference = entry["control_tokens"][None].to(device, dtype)
            shapes += [tuple(s) for s in entry["control_shapes"].tolist()]
        cond = (entry["prompt_embeds"][None].to(device, dtype), None)
        uncond = (entry["negative_embeds"][None].to(device, dtype), None) if cfg > 1 else None
        x = sampling.denoise(unwrap(model), x, cond, sigmas.to(device), shapes, uncond, cfg, reference)
        z = mmdit.unpack_latents(x, lh, lw, p).to(vae.post_quant_conv.weight.dtype)   # (1, 16, h, w)
        vae.to(device)                                  # the VAE waits on the CPU between validations
        image = vae.decode(vae.denormalize_latents(z.to(device)))                      # (1, 3, H, W)
        vae.to("cpu")
        out.append(images.postprocess(image.float(), "pil")[0])
    model.train(was_training)
    return out


def image_grid(pictures: list, columns: int = 4):
    from PIL import Image
    columns = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    w, h = max(p.width for p in pictures), max(p.height for p in pictures)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, p in enumerate(pictures):
        grid.paste(p, ((i % columns) * w, (i // columns) * h))
    return grid


def plot_loss(log_path: Path, png: Path) -> None:
    """loss.png from log.jsonl: the loss of every step and its running mean (PIL only: no plotting library)."""
    from PIL import Image, ImageDraw
    rows = read_log(log_path)
    if len(rows) < 2:
        return
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    smooth, avg = [], losses[0]
    for v in losses:
        avg = 0.9 * avg + 0.1 * v
        smooth.append(avg)
    W, H, m = 640, 360, 48
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1

    def xy(step, value):                                     # data -> pixel coordinates inside the frame
        x = m + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (W - 2 * m)
        return x, H - m - (value - lo) / (hi - lo) * (H - 2 * m)
    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(150, 170, 230), width=1)
    d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 40, 160), width=2)
    d.text((m, 12), f"training loss (running mean in dark blue), steps {steps[0]}-{steps[-1]}", fill="black")
    d.text((4, m - 6), f"{hi:.3g}", fill="black")
    d.text((4, H - m - 6), f"{lo:.3g}", fill="black")
    with weights.atomic_write(png) as f:
        image.save(f, format="PNG")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def prepare_data(c: TrainConfig, pipe, out: Path):
    """Read the examples (and class images), pair them, choose their sizes; -> (examples, class examples,
    sizes as (height, width), the cache folder). `pipe` (None on the other processes) checks Edit vs text."""
    examples = read_examples(c.data, c.control_dirs, c.instance_prompt)
    edit = isinstance(pipe, pipeline.QwenImageEditPipeline) if pipe is not None else bool(examples[0].controls)
    n_controls = len(examples[0].controls)
    if pipe is not None and edit and not 1 <= n_controls <= pipe.max_images:
        raise ValueError(f"--data: {type(pipe).__name__} trains with 1 to {pipe.max_images} condition image(s) per "
                         f"example (--control_dirs, or \"control\" in the .jsonl), got {n_controls}")
    if pipe is not None and not edit and n_controls:
        raise ValueError("--data has condition images but --model is a text-to-image checkpoint: use an Edit model")
    class_examples = []
    if c.with_prior_preservation:
        # As the reference's dataset: max(instances, class images) pairs, instance i % n with class i % m, so
        # that every class image is used (a few instance pictures against a hundred class pictures).
        class_files = read_examples(c.class_data_dir, instance_prompt=c.class_prompt, flag="--class_data_dir")
        n = max(len(examples), len(class_files))
        examples = [examples[i % len(examples)] for i in range(n)]
        class_examples = [Example(class_files[i % len(class_files)].image, c.class_prompt) for i in range(n)]
    sizes = [bucket_size(*image_size(e.image), c.resolution, c.square) for e in examples]
    cache_dir = Path(c.embeddings_cache) if c.embeddings_cache else out / "cache"
    return examples, class_examples, sizes, cache_dir


def train(c: TrainConfig, progress: bool = True) -> Path:
    """Run a training; -> the output folder. The steps are numbered below (docs/architecture.md follows them)."""
    check_config(c)
    rank, world, device = setup_distributed(c.device)
    main_process = rank == 0
    progress = progress and main_process
    out = Path(c.out)
    weights.check_writable_folder(out, f"--out {out}")
    for leftover in out.glob(".checkpoint-*"):                 # debris of an interrupted save
        if main_process:
            shutil.rmtree(leftover, ignore_errors=True)
    if checkpoints_in(out) and not c.resume_from_checkpoint:
        raise ValueError(f"--out {out} holds checkpoints of an earlier run: pass --resume_from_checkpoint latest "
                         "to continue it, or choose another --out")
    root = Path(c.model)
    class_name = pipeline.check_model_folder(root, "Qwen-Image")
    edit = "Edit" in class_name
    if not edit and (c.control_dirs or c.validation_image):
        raise ValueError(f"--control_dirs / --validation_image are for Edit models; {root} is a {class_name}")
    if edit and c.validation_prompt and len(c.validation_image) != len(c.validation_prompt):
        raise ValueError("--validation_prompt for an Edit model needs one --validation_image per prompt "
                         f"(the picture to edit): got {len(c.validation_prompt)} prompts, "
                         f"{len(c.validation_image)} images")
    weight_dtype = torch.bfloat16 if c.mixed_precision == "bf16" else torch.float32
    model_id = f"{model_fingerprint(root)}:{weight_dtype}"   # a bf16 cache is not an fp32 one

    # 1. Data and cache. The main process encodes; the others wait, then read the same files.
    pipe = None
    if main_process:
        cls = pipeline.QwenImageEditPipeline if edit else pipeline.QwenImagePipeline
        pipe = cls.from_pretrained(root, device=device, dtype=weight_dtype, offload=device.type == "cuda",
                                   load_transformer=False)      # loaded below, where it is trained
    examples, class_examples, sizes, cache_dir = prepare_data(c, pipe, out)
    if len(examples) < c.train_batch_size:
        warnings.warn(f"--train_batch_size {c.train_batch_size} is more than the {len(examples)} examples: "
                      "every micro-batch is the whole data set", stacklevel=2)
    with_empty = c.caption_dropout > 0
    validation = []
    if c.validation_prompt and c.finetune == "full" and world > 1:
        # Sampling on one process would wait forever on the others' shards: sample from a checkpoint instead.
        warnings.warn("--validation_prompt is skipped with --finetune full on several processes (FSDP2): "
                      "sample from a saved checkpoint's transformer/ instead", stacklevel=2)
        c = dataclasses.replace(c, validation_prompt=())
    if main_process:
        cache = build_cache(pipe, examples, sizes, cache_dir, "instance", with_empty, c.max_sequence_length,
                            c.train_batch_size, model_id, progress)
        class_cache = build_cache(pipe, class_examples, sizes, cache_dir, "class", False, c.max_sequence_length,
                                  c.train_batch_size, model_id, progress) if class_examples else []
        validation = validation_entries(c, pipe, edit)
        vae = pipe.vae.to("cpu") if validation or c.validation_steps else None
        del pipe                                               # the text encoder leaves memory here
    if world > 1:
        dist.barrier()
    if not main_process:
        cache = build_cache(None, examples, sizes, cache_dir, "instance", with_empty, c.max_sequence_length,
                            c.train_batch_size, model_id, progress=False)
        class_cache = build_cache(None, class_examples, sizes, cache_dir, "class", False, c.max_sequence_length,
                                  c.train_batch_size, model_id, progress=False) if class_examples else []
    examples_digest = hashlib.sha256("".join(p.name for p in cache).encode()).hexdigest()[:16]

    # 2. The model: the transformer, with what is trained in fp32.
    # FSDP2 moves each shard to the GPU as it shards: load on the CPU, so no GPU ever holds the whole model.
    sharded = c.finetune == "full" and world > 1
    transformer = mmdit.load(root / "transformer", device="cpu" if sharded else device,
                             dtype=weight_dtype if c.finetune == "lora" else torch.float32)
    transformer.requires_grad_(False)
    if c.finetune == "lora":
        targets = (c.lora_layers if c.lora_layers in lora.TARGET_PRESETS
                   else [t.strip() for t in c.lora_layers.split(",")])
        lora.add_adapter(transformer, "default", targets, c.rank, c.lora_alpha, c.lora_dropout,
                         generator=torch.Generator().manual_seed(c.seed))
        trainable = lora.trainable_parameters(transformer)
    else:
        transformer.requires_grad_(True)
        trainable = dict(transformer.named_parameters())
    for p in trainable.values():
        p.requires_grad_(True)
    transformer.gradient_checkpointing = c.gradient_checkpointing
    transformer.train()
    model = wrap_for_processes(transformer, c, world, device, weight_dtype)
    trainable_list = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable_list, c, device)

    # 3. Resume: weights and optimizer moments; the data order and every draw follow from the step.
    identity = run_identity(c, world, examples_digest)
    step, saved = 0, None
    if c.resume_from_checkpoint:
        found = checkpoints_in(out)
        if c.resume_from_checkpoint == "latest":
            saved = found[-1] if found else None
        else:
            saved = Path(c.resume_from_checkpoint)
        later = [p.name for p in found if saved is not None and p.parent.resolve() == saved.parent.resolve()
                 and checkpoint_step(p) > checkpoint_step(saved)]
        if later:
            raise ValueError(f"--resume_from_checkpoint {saved}: {out} holds later checkpoints ({', '.join(later)}) "
                             "that this run would mix with its own; move them away, or resume from 'latest'")
        if saved is not None:
            step = resume(saved, identity, model, optimizer, trainable, c)
        elif main_process:
            print(f"--resume_from_checkpoint latest: no checkpoint in {out}; starting a new run")
    if main_process:
        weights.write_json(out / "train_config.json", c.to_json())

    # 4. The loop.
    sched_config = scheduler.load(root / "scheduler").config
    schedule = scheduler.training_schedule(sched_config)                      # (timesteps, sigmas), 1000 each
    latents_mean, latents_std = (torch.tensor(v).view(1, -1, 1, 1) for v in vae_stats(root))   # (1, 16, 1, 1)
    buckets = tuple(tuple(s) for s in sizes)
    log_path = out / "log.jsonl"
    if main_process and log_path.exists():      # keep the log of the steps this run continues from
        kept = [row for row in read_log(log_path) if row["step"] <= step]
        with weights.atomic_write(log_path, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in kept))
    from tqdm.auto import tqdm
    bar = tqdm(total=c.max_train_steps, initial=step, desc="training", disable=not progress)
    started = time.perf_counter()
    # Full fine-tuning keeps fp32 master weights; bf16 compute comes from autocast (one process) or
    # from FSDP2's mixed-precision policy (several).
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=c.finetune == "full" and world == 1
                              and weight_dtype == torch.bfloat16)
    while step < c.max_train_steps:
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:                   # the schedule is a function of the step
            group["lr"] = c.learning_rate * lr_factor(c.lr_scheduler, step, c.lr_warmup_steps, c.max_train_steps)
        loss_sum = 0.0
        for j in range(c.gradient_accumulation_steps):
            # Micro-batches are numbered over the whole run: this step's are step * accumulation * world + ...,
            # so one process accumulating 2 sees what 2 processes see, and a resumed run what a straight one saw.
            index = (step * c.gradient_accumulation_steps + j) * world + rank
            batch = micro_batch(buckets, c.train_batch_size, c.seed, index)
            seed = micro_batch_seed(c.seed, index)
            torch.manual_seed(seed + 1)                         # LoRA dropout draws from the global RNG
            inputs = make_inputs(batch, cache, class_cache, c, torch.Generator().manual_seed(seed), latents_mean,
                                 latents_std, device, weight_dtype)
            last = j == c.gradient_accumulation_steps - 1
            sync = contextlib.nullcontext() if last or not isinstance(model, nn.parallel.DistributedDataParallel) \
                else model.no_sync()                            # average gradients across processes once per step
            with sync:
                with autocast:
                    loss = flow_matching_loss(model, **inputs, schedule=schedule, weighting_scheme=c.weighting_scheme,
                                              prior_loss_weight=c.prior_loss_weight if c.with_prior_preservation
                                              else None)
                (loss / c.gradient_accumulation_steps).backward()
            loss_sum += loss.item() / c.gradient_accumulation_steps
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the loss is {loss_sum} at step {step + 1}: training diverged (lower "
                                     "--learning_rate, keep --max_grad_norm, or use --mixed_precision no to "
                                     f"find the cause); the last good checkpoint is in {out}")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_list, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        optimizer.step()
        step += 1
        if world > 1:
            reduced = torch.tensor([loss_sum], device=device)     # NCCL reduces only GPU tensors
            dist.all_reduce(reduced)
            loss_sum = reduced.item() / world
        if main_process:
            row = {"step": step, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "seconds": round(time.perf_counter() - started, 3)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{row['lr']:.2e}")
            bar.update(1)
        if step % c.checkpointing_steps == 0 or step == c.max_train_steps:
            saved = checkpoint(out, step, model, optimizer, trainable, c, identity, main_process, world)
        if main_process and validation and ((c.validation_steps and step % c.validation_steps == 0)
                                            or step == c.max_train_steps):
            pictures = sample_validation(model, vae, validation, sched_config, c.validation_inference_steps,
                                         c.validation_cfg, c.seed, device)
            (out / "samples").mkdir(exist_ok=True)
            images.save_image(image_grid(pictures), out / "samples" / f"step-{step:06d}.png")
    bar.close()
    if main_process:
        plot_loss(log_path, out / "loss.png")
        if saved is not None:
            finish(out, saved, c)
    if world > 1:
        dist.barrier()
    return out


def main(argv=None) -> int:
    try:
        config = parse_args(argv)
        out = train(config)
    except (ValueError, weights.CheckpointError, OSError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training settings: one dataclass, TrainConfig; the command line and a --config JSON file are built from
its fields, and check_config checks every setting once, before anything loads.

    python -m qwenimage_minimal train --model DIR --data DIR --out DIR [--rank 16] ... [--config FILE.json]
        -> parse_args -> TrainConfig -> check_config -> train.train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fp8, lora, pipeline, prompts, weights

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MAX_RESOLUTION = 8192  # 8192² = 67 M pixels, 262,144 image tokens: far past Qwen-Image's ~1328² training size
# "mode" maps u to 1 - u - s (cos²(pi u / 2) - 1 + u): increasing in u, so inside [0, 1], only for
# -1 <= s <= 1 / (pi / 2 - 1) = 1.75 (its derivative is -1 - s (1 - pi/2 sin(pi u)))
MODE_SCALE_RANGE = (-1.0, 1 / (math.pi / 2 - 1))
# What validation samples with when neither a flag nor the model folder's pipeline_defaults.json says:
# the official pipelines' defaults
VALIDATION_DEFAULTS = {
    "validation_inference_steps": 20,
    "validation_cfg": 4.0,
    "validation_negative_prompt": " ",
}
DESCRIPTION = (
    "Fine-tuning Qwen-Image and Qwen-Image-Edit with flow matching: LoRA (default) or the full transformer."
)


def option(default, help: str, **kwargs):
    """A TrainConfig field: its default, its --help text, and what else argparse needs (choices, nargs,
    aliases, required); parse_args builds the command line from these."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Flag names follow diffusers' train_dreambooth_lora_qwen_image.py where it has them (its long names for
    --model / --data / --out are accepted too). Defaults differ where Qwen-Image's use differs: resolution 1024
    (the script: 512), batch 1 (4), max_train_steps 1000 (one epoch); --validation_prompt takes several."""

    model: str = option(
        None,
        "official Qwen-Image or Qwen-Image-Edit(-2509/-2511) folder",
        required=True,
        aliases=("--pretrained_model_name_or_path",),
    )
    data: str = option(
        None,
        "a folder of images with same-stem .txt captions, or a .jsonl file",
        required=True,
        aliases=("--instance_data_dir",),
    )
    out: str = option(
        None,
        "output folder: checkpoints, samples, log, the final LoRA / transformer",
        required=True,
        aliases=("--output_dir",),
    )
    # data
    resolution: int = option(
        1024,
        "target side in pixels (multiple of 16): images are bucketed at about "
        "resolution² pixels, or cropped to a square with --square",
    )
    square: bool = option(False, "resize and center-crop every image to resolution x resolution (no buckets)")
    control_dirs: tuple = option(
        (), "Edit: folders of condition images with the same stems (1 to 3 folders)", nargs="*"
    )
    instance_prompt: str = option(
        None, "caption for images that have no .txt file (otherwise that is an error)"
    )
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
    lora_layers: str = option(
        "diffusers",
        "LoRA targets: a preset (diffusers, attention, all-linear, "
        "all-linear-no-mod) or comma-separated module suffixes",
    )
    mixed_precision: str = option(
        "bf16", "bf16: frozen weights in bf16, trained ones in fp32; no: all fp32", choices=("bf16", "no")
    )
    gradient_checkpointing: bool = option(
        False, "recompute each block in backward (much less memory, ~30% slower)"
    )
    # optimisation
    learning_rate: float = option(1e-4, "peak learning rate")
    lr_scheduler: str = option(
        "constant",
        "constant (no warmup, as diffusers), constant_with_warmup, linear, cosine",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: int = option(0, "linear warmup steps (not used by 'constant')")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    use_ema: bool = option(
        False,
        "keep an exponential moving average of the trained weights: checkpoints, samples and the "
        "result are the average (ema.py)",
    )
    ema_decay: float = option(0.9999, "--use_ema: the average's decay (with a warmup: ema.py)")
    train_batch_size: int = option(1, "images per micro-batch per process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_train_steps: int = option(1000, "optimizer steps")
    weighting_scheme: str = option(
        "none", "timestep density / loss weighting (SD3)", choices=WEIGHTING_SCHEMES
    )
    logit_mean: float = option(
        0.0,
        "logit_normal: mean of logit(u); sigma ~ 1 - u here, so a positive mean "
        "means LESS noise (as in diffusers' script)",
    )
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
    validation_inference_steps: int = option(
        None,
        "sampling steps for validation (default: the model folder's pipeline_defaults.json "
        "num_inference_steps, else 20)",
    )
    validation_cfg: float = option(
        None,
        "true CFG scale for validation, 1: off (default: the model folder's pipeline_defaults.json "
        "true_cfg_scale, else 4.0)",
    )
    validation_negative_prompt: str = option(
        None,
        "CFG's negative prompt for validation (default: the model folder's pipeline_defaults.json "
        "negative_prompt, else \" \" as the official pipelines): the prompt the model learnt as 'no prompt'",
    )
    embeddings_cache: str = option(
        None,
        "folder of the cached latents and prompt embeddings (default: <out>/cache; "
        "diffusers' --cache_dir is its download cache, a different thing)",
    )
    device: str = option(None, "cuda or cpu (default: cuda when available)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig. --config FILE.json gives defaults; flags override it."""
    p = argparse.ArgumentParser(prog="python -m qwenimage_minimal train", description=DESCRIPTION)
    p.add_argument("--config", help="a JSON file of settings (keys: the flag names); flags override it")
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text, required = meta.pop("help"), meta.pop("required", False)
        names = (f"--{f.name}", *meta.pop("aliases", ()))
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a plain % is not text
        if f.type == "bool":
            p.add_argument(*names, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            # The default is shown unless there is none, or the help says it (a default that depends on
            # --out or on the model folder)
            shown = not required and f.default not in (None, ()) and "(default:" not in help_text
            p.add_argument(
                *names,
                dest=f.name,
                type=kind,
                default=None,
                help=help_text + (f" (default: {f.default})" if shown else ""),
                **meta,
            )
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
    optional = {f.name for f in dataclasses.fields(TrainConfig) if f.default is None}  # null: "not given"
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(
            f"--config {path}: unknown keys: {unknown} (the keys are the flag names, e.g. 'rank')"
        )
    out = {}
    for key, value in raw.items():
        kind = fields[key]
        if kind == "tuple" and isinstance(value, str):
            value = (value,)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "tuple": isinstance(value, list)
            and all(isinstance(v, str) for v in value)
            or isinstance(value, tuple),
        }.get(kind, isinstance(value, str)) or (value is None and key in optional)
        if not ok:
            raise ValueError(
                f"--config {path}: {key!r} must be {'a list of strings' if kind == 'tuple' else kind}, "
                f"got {json.dumps(value)} (leave the key out for the default)"
            )
        out[key] = tuple(value) if kind == "tuple" else value
    return out


def need(ok, message: str) -> None:
    """A setting's check: its error names the flag and what it must be."""
    if not ok:
        raise ValueError(message)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(c: TrainConfig) -> str:
    """Every setting, once, before anything loads: a clear error that names the flag. -> the pipeline class
    that --model's model_index.json names (QwenImagePipeline, or an Edit class)."""
    check_numbers(c)
    check_choices(c)
    check_folders(c)
    return check_model(c)


def check_numbers(c: TrainConfig) -> None:
    """Every number: its type, finite, in its range."""
    need(
        is_int(c.resolution) and 16 <= c.resolution <= MAX_RESOLUTION and c.resolution % 16 == 0,
        f"--resolution {c.resolution}: must be a multiple of 16 (one latent token covers 16x16 pixels) "
        f"from 16 to {MAX_RESOLUTION}, e.g. "
        + str(
            min(MAX_RESOLUTION, max(16, round(c.resolution / 16) * 16))
            if isinstance(c.resolution, (int, float)) and math.isfinite(c.resolution)
            else 1024
        ),
    )
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "rank",
        "checkpointing_steps",
    ):
        value = getattr(c, name)
        need(is_int(value) and value >= 1, f"--{name} must be a positive integer, got {value!r}")
    for name in ("lr_warmup_steps", "validation_steps"):
        value = getattr(c, name)
        need(is_int(value) and value >= 0, f"--{name} must be an integer >= 0, got {value!r}")
    for name in ("checkpoints_total_limit", "validation_inference_steps"):  # None: not given
        value = getattr(c, name)
        need(
            value is None or is_int(value) and value >= 1,
            f"--{name} must be a positive integer, got {value!r}",
        )
    need(
        is_int(c.max_sequence_length) and 1 <= c.max_sequence_length <= prompts.MAX_PROMPT_TOKENS,
        f"--max_sequence_length must be in 1..{prompts.MAX_PROMPT_TOKENS}, got {c.max_sequence_length!r}",
    )
    # The seed seeds torch.Generator (below 2**64) and, multiplied, every micro-batch's seed (mod 2**63)
    need(is_int(c.seed) and 0 <= c.seed < 2**63, f"--seed must be an integer in [0, 2**63), got {c.seed!r}")
    # Every float: finite (NaN passes every comparison as False, inf most), then its range
    low, high = MODE_SCALE_RANGE
    for name, ok, rule in (
        ("caption_dropout", lambda v: 0 <= v < 1, " in [0, 1)"),
        ("lora_dropout", lambda v: 0 <= v < 1, " in [0, 1)"),
        ("prior_loss_weight", lambda v: v >= 0, " >= 0 (a negative weight would maximise the prior loss)"),
        ("lora_alpha", lambda v: v > 0, " > 0 (the update is scaled by alpha / rank)"),
        ("learning_rate", lambda v: v > 0, " > 0"),
        ("adam_beta1", lambda v: 0 <= v < 1, " in [0, 1)"),
        ("adam_beta2", lambda v: 0 <= v < 1, " in [0, 1)"),
        ("adam_weight_decay", lambda v: v >= 0, " >= 0"),
        ("adam_epsilon", lambda v: v > 0, " > 0"),
        ("max_grad_norm", lambda v: v >= 0, " >= 0 (0: no clipping)"),
        ("ema_decay", lambda v: 0 < v < 1, " in (0, 1), e.g. 0.999"),
        ("logit_mean", lambda v: True, ""),
        ("logit_std", lambda v: v > 0, " > 0"),
        (
            "mode_scale",
            lambda v: low <= v <= high,
            f" in [{low:g}, {high:.3g}] (beyond, the 'mode' density leaves [0, 1])",
        ),
        ("validation_cfg", lambda v: v >= 1, " >= 1 (1: no CFG)"),
    ):
        value = getattr(c, name)
        if value is None and name == "validation_cfg":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        need(
            number and math.isfinite(value) and ok(value),
            f"--{name} must be a finite number{rule}, got {value!r}",
        )


def check_choices(c: TrainConfig) -> None:
    """Every setting that is one of a list (and the device)."""
    need(c.weighting_scheme in WEIGHTING_SCHEMES, f"--weighting_scheme must be one of {WEIGHTING_SCHEMES}")
    need(c.lr_scheduler in LR_SCHEDULERS, f"--lr_scheduler must be one of {LR_SCHEDULERS}")
    need(c.finetune in ("lora", "full"), f"--finetune must be lora or full, got {c.finetune!r}")
    need(
        c.mixed_precision in ("bf16", "no"),
        f"--mixed_precision must be bf16 or no (fp16 overflows in this "
        f"model's activations), got {c.mixed_precision!r}",
    )
    need(len(c.control_dirs) <= 3, f"--control_dirs: at most 3 condition folders, got {len(c.control_dirs)}")
    need(
        c.lora_layers in lora.TARGET_PRESETS or all(t.strip() for t in c.lora_layers.split(",")),
        f"--lora_layers {c.lora_layers!r}: a preset ({', '.join(lora.TARGET_PRESETS)}) or comma-separated "
        "module suffixes such as to_q,to_k,to_v,to_out.0",
    )
    check_device(c.device)


def check_folders(c: TrainConfig) -> None:
    """The folders named: they exist, and --out is not where the data is."""
    if c.resume_from_checkpoint not in (None, "latest"):
        need(
            Path(c.resume_from_checkpoint).is_dir(),
            f"--resume_from_checkpoint {c.resume_from_checkpoint}: no such "
            "folder (give a checkpoint-N folder, or 'latest')",
        )
    if c.with_prior_preservation:
        need(
            c.class_data_dir and c.class_prompt,
            "--with_prior_preservation needs --class_data_dir and --class_prompt",
        )
        need(not c.control_dirs, "--with_prior_preservation is for text-to-image (DreamBooth), not Edit")
    if not Path(c.model).is_dir():
        raise ValueError(f"--model {c.model}: no such folder (expected an official Qwen-Image folder)")
    if not Path(c.data).exists():
        raise ValueError(f"--data {c.data}: no such folder or file")
    # A run writes pictures (samples/, loss.png) into --out: inside a data folder, the next run trains on them
    out = Path(c.out).resolve()
    for flag, folder in (("--data", c.data), ("--class_data_dir", c.class_data_dir)):
        if folder and Path(folder).is_dir():
            need(
                not out.is_relative_to(Path(folder).resolve()),
                f"--out {c.out} is inside {flag} {folder}: the run's pictures (samples, loss.png) would be "
                "read as training pictures by the next run; choose an --out outside it",
            )


def check_model(c: TrainConfig) -> str:
    """The settings that depend on the model folder: text-to-image or Edit, fp8 or not. -> its class name."""
    root = Path(c.model)
    class_name = pipeline.check_model_folder(root, "Qwen-Image")
    edit = "Edit" in class_name
    need(
        edit or not (c.control_dirs or c.validation_image),
        f"--control_dirs / --validation_image are for Edit models; {root} is a {class_name}",
    )
    need(
        not edit or not c.validation_prompt or len(c.validation_image) == len(c.validation_prompt),
        "--validation_prompt for an Edit model needs one --validation_image per prompt (the picture to edit): "
        f"got {len(c.validation_prompt)} prompts, {len(c.validation_image)} images",
    )
    # fp8 weights are for sampling: LoRA would train on top of rounded weights with kernels that have no
    # backward for them, and full fine-tuning cannot update them (fp8.py)
    need(
        not fp8.is_fp8_folder(root / "transformer"),
        f"--model {root}: its transformer is stored in fp8, which training cannot use (--finetune lora or "
        f"full): convert it to bf16 first (python weights_convert.py {root / 'transformer'} "
        "COPY/transformer --dtype bf16, in a copy of the model folder) and train on that",
    )
    pipeline.read_pipeline_defaults(root)  # a damaged pipeline_defaults.json: an error now, not after caching
    return class_name


def check_device(name: str | None) -> None:
    """--device: a name torch knows, and CUDA only where there is a GPU (checked before anything loads)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r}: not a device name (cuda, cuda:1 or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: CUDA is not available here (no GPU, or a PyTorch built without CUDA: "
                f"{torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )


def with_model_defaults(c: TrainConfig) -> TrainConfig:
    """The validation settings not given, from the model folder's pipeline_defaults.json (what its model was
    made to sample with, e.g. the nano model's CFG 3 against the empty prompt), else the official pipelines'
    defaults (VALIDATION_DEFAULTS)."""
    folder = pipeline.read_pipeline_defaults(Path(c.model))
    found = {
        "validation_inference_steps": folder.get("num_inference_steps"),
        # the pipelines guide only above 1: a smaller scale is no guidance, which 1 says here
        "validation_cfg": None
        if "true_cfg_scale" not in folder
        else max(1.0, float(folder["true_cfg_scale"])),
        "validation_negative_prompt": folder.get("negative_prompt"),
    }
    settings = {}
    for name, default in VALIDATION_DEFAULTS.items():
        if getattr(c, name) is None:
            settings[name] = default if found[name] is None else found[name]
    return dataclasses.replace(c, **settings)

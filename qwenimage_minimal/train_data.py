"""The training data: examples, their sizes, their order, and the cache of what the frozen models make of them.

    data folder (image + same-stem .txt) or .jsonl ─ read_examples ─> [Example(image, prompt, controls)]
        ─ bucket_size(images.image_size) ─> each example's (height, width): ~resolution² pixels, a fixed ratio
        ─ build_cache (main process, once): images.load_pixels -> VAE posterior; caption -> prompt embeddings
        ─> one safetensors file per example, named by its content: <cache>/<key>.safetensors
    micro-batch i of the run ─ micro_batch (epoch_batches: shuffled within buckets) ─> example indices
        ─ read_cached, pad_prompts ─> train.make_inputs (a micro-batch's draws and the loss's inputs)

The data order is a pure function of (seed, epoch) and every micro-batch's draws of (seed, micro-batch
number), so neither is state to save: a resumed run, or one on several processes, sees what a straight
one on one process would.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import images, pipeline, weights, writing
from .train_config import TrainConfig
from .vae import LATENTS_MEAN, LATENTS_STD

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------
# Examples and their sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training example: a picture, its caption, and (Edit) the pictures it is made from."""

    image: Path  # the target image
    prompt: str
    controls: tuple = ()  # Edit: condition image paths, in order


def read_examples(
    data, control_dirs=(), instance_prompt: str | None = None, flag: str = "--data"
) -> list[Example]:
    """A folder of images + same-stem .txt captions (kohya / ai-toolkit / DreamBooth convention), or a
    .jsonl file of {"image": path, "prompt": str, "control": path or [paths]} (paths relative to the file).

    Rule for an image without a caption: --instance_prompt if given, else an error that names it."""
    data = Path(data)
    if data.is_file():
        if data.suffix != ".jsonl":
            raise ValueError(f"{flag} {data}: expected a folder of images and captions, or a .jsonl file")
        if control_dirs:
            raise ValueError(
                "--control_dirs is for a folder of images; in a .jsonl, name each example's "
                'condition images in its "control" entry'
            )
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
                raise ValueError(
                    f"{flag}: the caption {caption} is not UTF-8 text ({e.reason} at byte {e.start}); "
                    "save it as UTF-8"
                ) from None
            if not prompt:  # an empty file would train its picture on the empty prompt, unsaid
                raise ValueError(
                    f"{flag}: the caption {caption} is empty; write the picture's caption in it (or delete "
                    "it and pass --instance_prompt to caption it with that prompt)"
                )
        elif instance_prompt is not None:
            prompt = instance_prompt
        else:
            raise ValueError(
                f"{flag}: {path.name} has no caption file {caption.name}; write one, or pass "
                "--instance_prompt to use one prompt for every uncaptioned image"
            )
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
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("image"), str)
            or not isinstance(row.get("prompt"), str)
        ):
            raise ValueError(f'{where}: expected {{"image": "file.png", "prompt": "..."}}, got {line[:80]!r}')
        if not row["prompt"].strip():
            raise ValueError(
                f'{where}: the "prompt" of {row["image"]} is empty; write the picture\'s caption'
            )
        controls = row.get("control", row.get("edit_image", []))
        controls = [controls] if isinstance(controls, str) else controls
        if (
            not isinstance(controls, list)
            or not all(isinstance(c, str) for c in controls)
            or len(controls) > 3
        ):
            raise ValueError(f'{where}: "control" must be a path or a list of 1 to 3 paths')
        examples.append(
            Example(
                path.parent / row["image"], row["prompt"].strip(), tuple(path.parent / c for c in controls)
            )
        )
    if not examples:
        raise ValueError(f"--data {path}: no examples in this file")
    if len({len(e.controls) for e in examples}) > 1:
        raise ValueError(f"--data {path}: every example needs the same number of condition images")
    return examples


ASPECT_RATIOS = (
    1 / 3,
    9 / 21,
    1 / 2,
    9 / 16,
    2 / 3,
    3 / 4,
    4 / 5,
    1,
    5 / 4,
    4 / 3,
    3 / 2,
    16 / 9,
    2,
    21 / 9,
    3,
)


def bucket_size(width: int, height: int, resolution: int, square: bool = False) -> tuple[int, int]:
    """(height, width) to train an image at: the nearest aspect ratio of a fixed ladder (width / height,
    ASPECT_RATIOS) at about side² pixels, sides multiples of 16, so that images share buckets and batches
    stay full. side = resolution, or less for a smaller image (rounded down to a multiple of 64): small
    images are not upscaled (as in diffusers and ai-toolkit; one smaller than the smallest bucket in both sides
    is refused, check_not_too_small). square=True: resolution x resolution."""
    if square:
        return resolution, resolution
    side = min(resolution, max(64, int(math.sqrt(width * height)) // 64 * 64))
    ratio = min(ASPECT_RATIOS, key=lambda r: abs(math.log(r * height / width)))
    w = max(16, round(side * math.sqrt(ratio) / 16) * 16)
    h = max(16, round(side / math.sqrt(ratio) / 16) * 16)
    return h, w


def check_not_too_small(path: Path, resolution: int, flag: str = "--data") -> tuple[int, int]:
    """An image's (width, height), refused when it is smaller in both sides than its smallest bucket (about
    64² pixels, or resolution² below that): training would enlarge the whole picture, blur included. Larger
    images are never enlarged but for rounding to the ladder (a side to the next multiple of 16)."""
    width, height = images.image_size(path)
    h, w = bucket_size(width, height, min(resolution, 64))
    if width < w and height < h:
        raise ValueError(
            f"{flag}: {path} is {width}x{height} pixels, smaller than the smallest training size of its "
            f"shape ({w}x{h}): training would enlarge it; use a larger picture, or remove it"
        )
    return width, height


# ---------------------------------------------------------------------------------------------
# The data order: micro-batches as a function of (seed, epoch), draws of (seed, micro-batch)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # micro_batch asks for the same epoch at every step
def epoch_batches(buckets: tuple, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices): shuffled within each bucket, cut into
    batches (the last of a bucket may be short), the batches shuffled. A pure function of (seed, epoch):
    the data order is never state to save."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)  # any --seed below 2**63
    by_bucket = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(i)
    batches = []
    for key in sorted(by_bucket):
        members = by_bucket[key]
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        batches += [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
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


def cache_key(
    model_id: str, kind: str, example: Example, size, max_sequence_length: int, with_empty: bool
) -> str:
    parts = [
        model_id,
        kind,
        file_digest(example.image),
        example.prompt,
        str(tuple(size)),
        str(max_sequence_length),
        str(with_empty),
    ] + [file_digest(c) for c in example.controls]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def encode_examples(
    pipe, examples: list[Example], sizes: list, with_empty: bool, max_sequence_length: int, batch_size: int
) -> list[dict]:
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
            chunk = members[k : k + batch_size]
            pixels = torch.cat([images.load_pixels(examples[i].image, size) for i in chunk])  # (b, 3, H, W)
            with pipe.active(pipe.vae) as ae, torch.no_grad():
                posterior = ae.encode(
                    pixels.to(pipe.device, vae_dtype)
                )  # N(mean, exp(logvar)), (b, C, h, w) each
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
    for i, e in enumerate(examples):  # Edit: each prompt is read with its own images
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
    vae_images = [images.postprocess(images.load_pixels(p, (h, w), "control image"), "pil")[0] for p in paths]
    if pipe.condition_area is None:
        return vae_images, vae_images
    return [images.resize_to_area(img, pipe.condition_area) for img in vae_images], vae_images


def build_cache(
    pipe,
    examples,
    sizes,
    cache_dir: Path,
    kind: str,
    with_empty: bool,
    max_sequence_length: int,
    batch_size: int,
    model_id: str,
    progress: bool = True,
) -> list[Path]:
    """The cache file of every example, computing the missing ones (in batches) and writing each
    atomically, so an interrupted run loses nothing it finished and leaves nothing half-written. A file
    that is there but damaged (truncated by a copy, a full disk) is computed again."""
    keys = [cache_key(model_id, kind, e, s, max_sequence_length, with_empty) for e, s in zip(examples, sizes)]
    paths = [cache_dir / f"{k}.safetensors" for k in keys]
    if pipe is not None:  # the process that writes
        remove_stale_temporary_files(cache_dir)
    todo = [i for i, p in enumerate(paths) if not whole_cache_file(p)]
    if todo:
        bar = tqdm(total=len(todo), desc=f"caching {kind} images", unit="image", disable=not progress)
        for start in range(0, len(todo), 16 * batch_size):
            chunk = todo[start : start + 16 * batch_size]
            entries = encode_examples(
                pipe,
                [examples[i] for i in chunk],
                [sizes[i] for i in chunk],
                with_empty,
                max_sequence_length,
                batch_size,
            )
            for i, entry in zip(chunk, entries):
                names = sorted(entry)
                writing.write_safetensors(
                    paths[i],
                    [(n, tuple(entry[n].shape), entry[n].dtype) for n in names],
                    [entry[n] for n in names],
                    metadata={"image": str(examples[i].image)},
                )
            bar.update(len(chunk))
        bar.close()
    return paths


STALE_AFTER_S = 600  # a cache file is written in well under a second: a temporary file this old is debris


def remove_stale_temporary_files(folder: Path) -> None:
    """The temporary files writing.atomic_write leaves when its process is killed (SIGKILL, power cut: no
    clean-up runs), .<key>.safetensors.<random>.partial. Only the stale ones: another run sharing the cache
    may be writing its own right now."""
    now = time.time()
    for tmp in folder.glob(".*.safetensors.*.partial"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: the cache still works
            if tmp.is_file() and now - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()


def whole_cache_file(path: Path) -> bool:
    """Is the cache file there, with every tensor inside it (the header checked against the file's size)?"""
    if not path.is_file():
        return False
    try:
        weights.SafetensorsFile(path)
    except weights.CheckpointError:
        return False
    return True


def read_cached(path: Path) -> dict:
    """One cache file -> its tensors (encode_examples lists them), on the CPU."""
    try:
        return load_file(str(path))
    except SafetensorError:
        raise ValueError(
            f"the cache file {path} is truncated or corrupt; delete it, and the next run computes it again"
        ) from None


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
# What train() calls: the examples paired and sized, then cached
# ---------------------------------------------------------------------------------------------


def prepare_data(c: TrainConfig, pipe, out: Path):
    """Read the examples (and class images), pair them, choose their sizes; -> (examples, class examples,
    sizes as (height, width), the cache folder). `pipe` (None on the other processes) checks Edit vs text."""
    examples = read_examples(c.data, c.control_dirs, c.instance_prompt)
    n_controls = len(examples[0].controls)
    edit = isinstance(pipe, pipeline.QwenImageEditPipeline)
    if edit and not 1 <= n_controls <= pipe.max_images:
        raise ValueError(
            f"--data: {type(pipe).__name__} trains with 1 to {pipe.max_images} condition image(s) per "
            f'example (--control_dirs, or "control" in the .jsonl), got {n_controls}'
        )
    if pipe is not None and not edit and n_controls:
        raise ValueError(
            "--data has condition images but --model is a text-to-image checkpoint: use an Edit model"
        )
    class_examples = []
    if c.with_prior_preservation:
        # As the reference's dataset: max(instances, class images) pairs, instance i % n with class i % m, so
        # that every class image is used (a few instance pictures against a hundred class pictures).
        class_files = read_examples(c.class_data_dir, instance_prompt=c.class_prompt, flag="--class_data_dir")
        n = max(len(examples), len(class_files))
        examples = [examples[i % len(examples)] for i in range(n)]
        class_examples = [Example(class_files[i % len(class_files)].image, c.class_prompt) for i in range(n)]
    sizes = [
        bucket_size(*check_not_too_small(e.image, c.resolution), c.resolution, c.square) for e in examples
    ]
    for e in {e.image: e for e in class_examples}.values():
        check_not_too_small(e.image, c.resolution, "--class_data_dir")
    cache_dir = Path(c.embeddings_cache) if c.embeddings_cache else out / "cache"
    return examples, class_examples, sizes, cache_dir


def build_caches(
    pipe,
    examples,
    class_examples,
    sizes,
    cache_dir: Path,
    c: TrainConfig,
    model_id: str,
    progress: bool = True,
) -> tuple[list[Path], list[Path]]:
    """The cache files of the examples (with the empty prompt's embeddings when --caption_dropout can drop
    a caption) and of the class images (prior preservation; never dropped). pipe=None: the files must exist."""
    cache = build_cache(
        pipe,
        examples,
        sizes,
        cache_dir,
        "instance",
        c.caption_dropout > 0,
        c.max_sequence_length,
        c.train_batch_size,
        model_id,
        progress,
    )
    class_cache = (
        build_cache(
            pipe,
            class_examples,
            sizes,
            cache_dir,
            "class",
            False,
            c.max_sequence_length,
            c.train_batch_size,
            model_id,
            progress,
        )
        if class_examples
        else []
    )
    return cache, class_cache


# ---------------------------------------------------------------------------------------------
# Before the loop: the examples sized and cached, the validation prompts encoded
# ---------------------------------------------------------------------------------------------


def vae_stats(root: Path):
    """The per-channel mean and std that normalise the VAE's latents: its config's, else the official ones."""
    raw = weights.read_config(root / "vae")
    return raw.get("latents_mean", LATENTS_MEAN), raw.get("latents_std", LATENTS_STD)


def validation_entries(c: TrainConfig, pipe, edit: bool) -> list[dict]:
    """The validation prompts' embeddings and the negative prompt's (--validation_negative_prompt), and Edit's
    condition latents, computed while the text encoder is loaded, at --resolution (Edit: the condition
    image's bucket)."""
    entries = []
    controls = [Path(p) for p in c.validation_image]  # check_config: one per prompt
    for i, prompt in enumerate(c.validation_prompt):
        if not edit:
            embeds, mask = pipe.encode_prompt(prompt, max_sequence_length=c.max_sequence_length)
            negative, _ = pipe.encode_prompt(
                c.validation_negative_prompt, max_sequence_length=c.max_sequence_length
            )
            entries.append(
                {
                    "prompt_embeds": embeds[0].float().cpu(),
                    "negative_embeds": negative[0].float().cpu(),
                    "size": (c.resolution, c.resolution),
                }
            )
            continue
        size = bucket_size(*images.image_size(controls[i]), c.resolution, c.square)
        condition, vae_images = condition_images(pipe, [controls[i]], size)
        features = pipe.image_features(condition)
        tokens, shapes = pipe.encode_image_latents(vae_images)
        entries.append(
            {
                "prompt_embeds": pipe.encode_prompt(prompt, features)[0][0].float().cpu(),
                "negative_embeds": pipe.encode_prompt(c.validation_negative_prompt, features)[0][0]
                .float()
                .cpu(),
                "size": size,
                "control_tokens": tokens[0].float().cpu(),
                "control_shapes": torch.tensor(shapes),
            }
        )
    return entries


def prepare_cache(
    c: TrainConfig,
    root: Path,
    edit: bool,
    device,
    weight_dtype,
    main_process: bool,
    world: int,
    progress: bool,
):
    """Read and size the examples, fill the cache: the main process encodes while the others wait, then they
    read the same files. -> (the pipeline without its text encoder, kept for validation (None on the other
    processes or without validation prompts), the TrainingData, the validation entries)."""
    pipe = None
    if main_process:
        cls = pipeline.QwenImageEditPipeline if edit else pipeline.QwenImagePipeline
        pipe = cls.from_pretrained(
            root, device=device, dtype=weight_dtype, offload=device.type == "cuda", load_transformer=False
        )  # loaded in prepare_model, where it is trained
    examples, class_examples, sizes, cache_dir = prepare_data(c, pipe, Path(c.out))
    if len(examples) < c.train_batch_size:
        warnings.warn(
            f"--train_batch_size {c.train_batch_size} is more than the {len(examples)} examples: "
            "every micro-batch is the whole data set",
            stacklevel=3,
        )
    model_id = f"{model_fingerprint(root)}:{weight_dtype}"  # a bf16 cache is not an fp32 one
    validation = []
    if main_process:
        cache, class_cache = build_caches(
            pipe, examples, class_examples, sizes, cache_dir, c, model_id, progress
        )
        validation = validation_entries(c, pipe, edit)
        pipe.text_encoder = None  # the text encoder leaves memory here
        if edit:
            pipe.vision_tower = None
        if not validation:
            pipe = None  # and without validation, the VAE too
    if world > 1:
        dist.barrier()
    if not main_process:
        cache, class_cache = build_caches(
            None, examples, class_examples, sizes, cache_dir, c, model_id, progress=False
        )
    latents_mean, latents_std = (torch.tensor(v).view(1, -1, 1, 1) for v in vae_stats(root))  # (1, 16, 1, 1)
    data = TrainingData(cache, class_cache, tuple(tuple(s) for s in sizes), latents_mean, latents_std)
    return pipe, data, validation


# ---------------------------------------------------------------------------------------------
# What the loop draws from
# ---------------------------------------------------------------------------------------------


class TrainingData(NamedTuple):
    """What the loop draws its micro-batches from."""

    cache: list  # the cache file of every example (train_data.build_cache)
    class_cache: list  # and of its class image (prior preservation), or []
    buckets: tuple  # every example's (height, width)
    latents_mean: torch.Tensor  # (1, C, 1, 1): normalise the cached latents (vae_stats)
    latents_std: torch.Tensor  # (1, C, 1, 1)

"""The nano recipe, start to end: scenes -> the VAE trained (vae_training.py) -> its latent statistics -> the MMDiT
trained from random init by the project's own training loop (train.py), then once more from its average on new
scenes (a warm restart) -> measured (measure.py).

    python -m qwenimage_minimal train-nano [--out out/nano] [--quick] [--overwrite]
        (make nano, about 70 CPU minutes; out/nano/model is checkpoints/nano)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .. import checkpoints, sizes, train, train_config, writing
from .. import vae as vae_file
from ..pipeline import loading as pipeline_loading
from . import QUICK, NanoConfig, scenes
from .measure import measure, store_in_bf16
from .vae_training import latent_statistics, other_pictures, train_vae


def first_and_last(losses: list) -> dict:
    """The mean loss of the first and of the last tenth of a run (single steps are too noisy to compare)."""
    tenth = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth}


# The work folder's marker, written first: a folder without it was not made by this recipe, and nothing in it
# is removed. Beside it, the recipe writes only ENTRIES.
MARKER = ".train-nano"
ENTRIES = (MARKER, "data", "run", "refine_data", "refine_run", "model", "report.json")


def prepare_out(out: Path, overwrite: bool = False) -> None:
    """--out before a build: a new or empty folder, or the work folder of an earlier build (its MARKER, and
    nothing the recipe does not write), whose data/, run/, refine_data/, refine_run/ and model/ are then
    removed; a finished model (model/report.json, written last) only with `overwrite`. Checked before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file: give a folder (the recipe writes its data, runs and model/ in it)"
        )
    writing.check_writable_folder(out, f"--out {out}")
    entries = sorted(p.name for p in out.iterdir())
    if entries and MARKER not in entries:
        raise ValueError(
            f"--out {out} is not empty ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}) and "
            f"was not made by train-nano (no {MARKER} file): choose a new or empty folder"
        )
    foreign = [e for e in entries if e not in ENTRIES]
    if foreign:
        raise ValueError(
            f"--out {out} holds {', '.join(foreign)}, which train-nano did not write and would not keep "
            "apart from its own: move them away, or choose another --out"
        )
    if (out / "model" / "report.json").is_file() and not overwrite:
        raise ValueError(
            f"--out {out} holds a finished nano model ({out / 'model'}): pass --overwrite to train a new one "
            "in its place, or choose another --out"
        )
    with writing.atomic_write(out / MARKER, "w") as f:
        f.write("the work folder of `python -m qwenimage_minimal train-nano` (nano/recipe.py)\n")
    for leftover in ENTRIES[1:]:  # a fresh run: nothing of an earlier one is mixed in
        path = out / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def build(c: NanoConfig, log=print, overwrite: bool = False) -> dict:
    """Run the recipe; -> a report (losses, PSNR, scores, minutes). The model is written to <out>/model, in a
    folder that is new, empty or an earlier build's (prepare_out; a finished model only with `overwrite`)."""
    start = time.time()
    minutes = lambda: round((time.time() - start) / 60, 2)
    out = Path(c.out)
    prepare_out(out, overwrite)
    report = {"config": dataclasses.asdict(c)}

    # 0. data: the training scenes as a captioned folder (what train.py reads), a held-out set for the VAE
    train_scenes = scenes.write_dataset(out / "data", c.train_scenes, seed=c.seed, split="train", size=c.size)
    held_out = {  # the VAE's two tests: scenes it never saw, and colours and shapes the scenes never have
        "held_out": scenes.pictures_of(
            scenes.make_scenes(c.held_out_pictures, seed=c.seed + 1, split="held_out"), c.size
        ),
        "outside": scenes.pictures_of(scenes.outside_scenes(c.held_out_pictures, seed=c.seed + 1), c.size),
    }
    log(f"[{minutes()} min] {len(train_scenes)} training scenes in {out / 'data'}")

    # 1. a random nano Qwen-Image in the official layout; 2. its VAE trained, its latent statistics measured
    model = sizes.write_checkpoint(out / "model", "nano", seed=c.seed)
    # what the model is made to sample with, read by the pipelines and by train.py's validation
    writing.write_json(
        model / pipeline_loading.DEFAULTS_FILE,
        {
            "height": c.size,
            "width": c.size,
            "num_inference_steps": c.eval_steps,
            "true_cfg_scale": c.eval_cfg,
            "negative_prompt": c.eval_negative,
        },
    )
    autoencoder = vae_file.load(model / "vae")
    pictures = scenes.pictures_of(train_scenes, c.size)
    others = other_pictures(c.vae_other_pictures, c.size, seed=c.seed + 6)  # keeps the VAE general
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        rows = train_vae(
            autoencoder,
            torch.cat([pictures, others]),
            held_out,
            c.vae_steps,
            batch=c.vae_batch,
            crop=c.vae_crop,
            lr=c.vae_lr,
            seed=c.seed,
            eval_every=c.vae_eval_every,
            log=lambda m: log(f"[{minutes()} min] {m}"),
        )
    mean, std = latent_statistics(autoencoder.eval(), pictures[:1000])
    config = dataclasses.replace(autoencoder.config, latents_mean=mean, latents_std=std)
    sizes.save_tensors(autoencoder, model / "vae" / f"{vae_file.WEIGHTS_STEM}.safetensors")
    writing.write_json(model / "vae" / "config.json", config.to_json())
    report["vae"] = {
        **first_and_last([r["reconstruction"] for r in rows]),
        "held_out_psnr": rows[-1]["held_out_psnr"],
        "outside_psnr": rows[-1]["outside_psnr"],
        "minutes": minutes(),
        "log": rows,
    }

    # 3. the MMDiT, from its random init, by the project's training loop
    settings = train_config.TrainConfig(
        model=str(model),
        data=str(out / "data"),
        out=str(out / "run"),
        resolution=c.size,
        square=True,
        finetune="full",
        mixed_precision="no",
        learning_rate=c.dit_lr,
        lr_scheduler="cosine",
        weighting_scheme=c.dit_weighting,
        lr_warmup_steps=min(100, c.dit_steps // 4),
        train_batch_size=c.dit_batch,
        max_train_steps=c.dit_steps,
        caption_dropout=c.caption_dropout,
        use_ema=c.dit_ema_decay > 0,
        ema_decay=c.dit_ema_decay or 0.9999,
        adam_weight_decay=0.0,
        seed=c.seed,
        checkpointing_steps=min(c.dit_checkpoint_every, c.dit_steps),
        validation_prompt=tuple(
            scenes.caption(s) for s in scenes.make_scenes(4, seed=c.seed + 2, split="held_out")
        ),
        validation_steps=max(1, c.dit_steps // 4),
        validation_inference_steps=c.eval_steps,
        validation_cfg=c.eval_cfg,
        validation_negative_prompt=c.eval_negative,  # the empty prompt that caption dropout trains
    )
    log(f"[{minutes()} min] training the MMDiT: {c.dit_steps} steps of {c.dit_batch}")
    train.train(settings)
    report["mmdit"] = {
        **first_and_last([r["loss"] for r in checkpoints.read_log(out / "run" / "log.jsonl")]),
        "minutes": minutes(),
    }
    shutil.rmtree(model / "transformer")
    shutil.copytree(out / "run" / "transformer", model / "transformer")

    # 4. a warm restart: from the run's average, a second, lower cosine on scenes the first run never saw. The VAE
    # and text encoder are stored in bf16 first (as committed), so that these latents are the ones sampling sees
    if c.dit_refine_steps:
        for part in ("vae", "text_encoder"):
            store_in_bf16(model / part)
        scenes.write_dataset(
            out / "refine_data", c.dit_refine_scenes, seed=c.seed + 7, split="train", size=c.size
        )
        refine = dataclasses.replace(
            settings,
            data=str(out / "refine_data"),
            out=str(out / "refine_run"),
            learning_rate=c.dit_refine_lr,
            lr_warmup_steps=min(100, c.dit_refine_steps // 4),
            max_train_steps=c.dit_refine_steps,
            seed=c.seed + 7,
            checkpointing_steps=max(1, c.dit_refine_steps // 2),
            validation_steps=max(1, c.dit_refine_steps // 4),
        )
        log(
            f"[{minutes()} min] the warm restart: {c.dit_refine_steps} steps at {c.dit_refine_lr} on new scenes"
        )
        train.train(refine)
        report["mmdit"]["refine"] = {
            **first_and_last([r["loss"] for r in checkpoints.read_log(out / "refine_run" / "log.jsonl")]),
            "minutes": minutes(),
        }
        shutil.rmtree(model / "transformer")
        shutil.copytree(out / "refine_run" / "transformer", model / "transformer")

    report["minutes"] = minutes()
    writing.write_json(out / "report.json", report)
    return measure(c, log=lambda m: log(f"[{minutes()} min] {m}"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m qwenimage_minimal train-nano", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out",
        default=NanoConfig.out,
        help="work folder (new, empty, or an earlier build's); the model is written to OUT/model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="a CI-sized run (about a minute): losses fall, nothing more"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished model in OUT/model")
    a = p.parse_args(argv)
    try:
        return build(NanoConfig(out=a.out, seed=a.seed, **(QUICK if a.quick else {})), overwrite=a.overwrite)
    except (ValueError, OSError, FloatingPointError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None

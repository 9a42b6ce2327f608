"""The nano Edit recipe: edit pairs (edits.py) -> a nano Qwen-Image-Edit-2509 folder made from the nano
text-to-image model -> its MMDiT fine-tuned on the pairs by the project's own training loop (train.py's Edit
path) -> stored in bf16 and measured.

The folder is the text-to-image model's (its MMDiT as the start, its VAE, tokenizer and frozen random text
encoder) plus what Edit adds: a vision tower, frozen at its random initialisation like the text encoder it
feeds (the MMDiT learns to read what it gives; notebook 06 measures how much it does), processor/, and the
image areas a 128-pixel model needs in pipeline_defaults.json (the official pipelines' ~1024² for the VAE and
~384² for the vision tower would be 64 and 9 times the pictures' size).

    python -m qwenimage_minimal train-nano-edit [--out out/nano_edit] [--quick] [--overwrite]
        (make nano-edit; out/nano_edit/model is what checkpoints/nano_edit holds, committed as a copy whose
        files equal to checkpoints/nano's were then made links to them by `share_with`)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path

import torch

from .. import checkpoints, images, pipeline, sizes, train, train_config, weights, writing
from ..pipeline import loading as pipeline_loading
from . import COMMITTED, edits, scenes
from .measure import store_in_bf16
from .recipe import first_and_last, prepare_out


@dataclasses.dataclass
class NanoEditConfig:
    """Every setting of the recipe; QUICK_EDIT (below) is the CI-sized run, the defaults the committed model's."""

    out: str = "out/nano_edit"  # data/, run/ (train.py's output), model/ (the checkpoint)
    base: str = str(COMMITTED)  # the nano text-to-image model it starts from
    seed: int = 0
    size: int = 128
    # the vision tower sees 84 x 84 px (the processor's multiples of 28): 6 x 6 patches, 3 x 3 tokens after merging
    condition_area: int = 96 * 96
    train_edits: int = 4000
    steps: int = 7000
    batch: int = 16
    lr: float = 5e-4
    weighting: str = "logit_normal"
    # the timesteps' logit-normal mean: -0.7 puts more steps at high noise, where only the reference latents show
    # the picture. With it (from the restarted nano model) 81% of 500 held-out edits are carried out, against 75%
    # for the model before (mean 0, an older start: the two changes are not separated); kept did not change
    logit_mean: float = -0.7
    caption_dropout: float = 0.1  # the empty instruction (with the same picture): CFG's unconditional branch
    ema_decay: float = 0.999
    checkpoint_every: int = 1500
    eval_edits: int = 100  # per split, the five kinds in turn
    eval_steps: int = 20
    eval_cfgs: tuple = (1.0, 2.0, 4.0)
    cfg: float = 2.0  # the folder's default (pipeline_defaults.json): the best of eval_cfgs, measured
    negative: str = ""


QUICK_EDIT = dict(
    train_edits=40, steps=40, batch=4, checkpoint_every=40, eval_edits=5, eval_steps=4, eval_cfgs=(1.0, 2.0)
)


def write_data(folder: Path, n: int, seed: int, size: int) -> list[edits.Edit]:
    """n training edits as train.py's Edit data: target/edit-00000.png with its instruction in edit-00000.txt,
    and the picture it is made from in source/edit-00000.png (--data target --control_dirs source)."""
    made = edits.make_edits(n, seed=seed, split="train")
    for part in ("target", "source"):
        writing.check_writable_folder(folder / part, f"cannot write the edits to {folder / part}")
    for i, e in enumerate(made):
        images.save_image(scenes.render(e.target, size), folder / "target" / f"edit-{i:05d}.png")
        images.save_image(scenes.render(e.source, size), folder / "source" / f"edit-{i:05d}.png")
        with writing.atomic_write(folder / "target" / f"edit-{i:05d}.txt", "w") as f:
            f.write(edits.instruction(e) + "\n")
    return made


def make_folder(model: Path, base: Path, c: NanoEditConfig) -> None:
    """The nano Edit-2509 folder before fine-tuning: sizes.write_checkpoint's random nano Edit layout, whose
    MMDiT, VAE, tokenizer, scheduler and language model are then replaced by the base model's."""
    sizes.write_checkpoint(model, "nano", "QwenImageEditPlusPipeline", seed=c.seed)
    for part in ("transformer", "vae", "tokenizer", "scheduler"):
        shutil.rmtree(model / part)
        shutil.copytree(base / part, model / part)
    # the language model's shard holds exactly the base text encoder's tensors (the vision tower is the other)
    shutil.copyfile(
        base / "text_encoder" / "model.safetensors",
        model / "text_encoder" / "model-00001-of-00002.safetensors",
    )
    defaults = pipeline_loading.read_pipeline_defaults(base)
    defaults.update(
        num_inference_steps=c.eval_steps,
        true_cfg_scale=c.cfg,  # not the text-to-image model's: its own measured best
        negative_prompt=c.negative,
        vae_area=c.size * c.size,
        output_area=c.size * c.size,
        condition_area=c.condition_area,
    )
    writing.write_json(model / pipeline_loading.DEFAULTS_FILE, defaults)


def edit_all(
    pipe, edit_list, cfg: float, steps: int, negative: str = "", seed: int = 0, size: int = 128
) -> list:
    """Each edit's source picture (`size` px) edited by its instruction (`steps` steps, CFG `cfg` against
    `negative`, noise from `seed`) -> the PIL results."""
    return [
        pipe(
            image=scenes.render(e.source, size),
            prompt=edits.instruction(e),
            negative_prompt=negative if cfg > 1 else None,
            true_cfg_scale=cfg,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        ).images[0]
        for e in edit_list
    ]


def measure(c: NanoEditConfig, log=print) -> dict:
    """The folder stored in bf16, then measured as stored on held-out and training-like edits at each CFG of
    c.eval_cfgs: -> {"held_out": {cfg: edits.evaluate}, "train_like": ...}, written into the report."""
    out = Path(c.out)
    model = out / "model"
    report = weights.read_config(out, "report.json")
    store_in_bf16(model)
    pipe = pipeline.QwenImageEditPlusPipeline.from_pretrained(model, dtype=torch.float32)
    start = time.time()
    for split, seed in (("held_out", c.seed + 3), ("train", c.seed + 5)):
        name = "held_out" if split == "held_out" else "train_like"
        edit_list = edits.make_edits(c.eval_edits, seed=seed, split=split)
        report[name] = {}
        for cfg in c.eval_cfgs:
            scores = edits.evaluate(
                edit_all(pipe, edit_list, cfg, c.eval_steps, c.negative, size=c.size), edit_list
            )
            report[name][str(cfg)] = scores
            log(
                f"{name} CFG {cfg}: "
                + ", ".join(f"{k} {v['done']:.2f}/{v['kept']:.2f}" for k, v in scores.items())
            )
    report["measure_minutes"] = round((time.time() - start) / 60, 2)
    writing.write_json(out / "report.json", report)
    writing.write_json(model / "report.json", report)
    return report


def check_base(base: Path, out: Path) -> None:
    """--base: a nano text-to-image folder (QwenImagePipeline, its text encoder in one file, which the Edit
    folder's language-model shard takes as it is), not inside --out (whose model/ a new run removes)."""
    class_name = pipeline.check_model_folder(base, "Qwen-Image")
    if class_name != "QwenImagePipeline":
        raise ValueError(
            f"--base {base} is a {class_name} folder: give a text-to-image one (checkpoints/nano)"
        )
    if not (base / "text_encoder" / "model.safetensors").is_file():
        raise ValueError(
            f"--base {base}: text_encoder/model.safetensors is missing (a nano folder keeps its text encoder "
            "in one file)"
        )
    if base.resolve().is_relative_to(out.resolve()):
        raise ValueError(
            f"--base {base} is inside --out {out}, which the recipe clears: choose another --out"
        )


def build(c: NanoEditConfig, log=print, overwrite: bool = False) -> dict:
    """Run the recipe; -> the report. The model is written to <out>/model (prepare_out's rules for <out>)."""
    start = time.time()
    minutes = lambda: round((time.time() - start) / 60, 2)
    out, base = Path(c.out), Path(c.base)
    check_base(base, out)  # before prepare_out removes an earlier run's data/, run/ and model/
    prepare_out(out, overwrite)
    made = write_data(out / "data", c.train_edits, c.seed, c.size)
    log(f"[{minutes()} min] {len(made)} training edits in {out / 'data'}")
    model = out / "model"
    make_folder(model, base, c)
    probe = edits.make_edits(2, seed=c.seed + 2, split="held_out")
    (out / "data" / "probe").mkdir(parents=True, exist_ok=True)
    for i, e in enumerate(probe):  # train.py's validation edits these two held-out pictures
        images.save_image(scenes.render(e.source, c.size), out / "data" / "probe" / f"probe-{i}.png")
    settings = train_config.TrainConfig(
        model=str(model),
        data=str(out / "data" / "target"),
        control_dirs=(str(out / "data" / "source"),),
        out=str(out / "run"),
        resolution=c.size,
        square=True,
        finetune="full",
        mixed_precision="no",
        learning_rate=c.lr,
        lr_scheduler="cosine",
        weighting_scheme=c.weighting,
        logit_mean=c.logit_mean,
        lr_warmup_steps=min(100, c.steps // 4),
        train_batch_size=c.batch,
        max_train_steps=c.steps,
        caption_dropout=c.caption_dropout,
        use_ema=c.ema_decay > 0,
        ema_decay=c.ema_decay or 0.9999,
        adam_weight_decay=0.0,
        seed=c.seed,
        checkpointing_steps=min(c.checkpoint_every, c.steps),
        validation_prompt=tuple(edits.instruction(e) for e in probe),
        validation_image=tuple(str(out / "data" / "probe" / f"probe-{i}.png") for i in range(len(probe))),
        validation_steps=max(1, c.steps // 4),
        validation_inference_steps=c.eval_steps,
        validation_negative_prompt=c.negative,
    )
    log(f"[{minutes()} min] fine-tuning the MMDiT on edits: {c.steps} steps of {c.batch}")
    train.train(settings)
    losses = [r["loss"] for r in checkpoints.read_log(out / "run" / "log.jsonl")]
    report = {
        "config": dataclasses.asdict(c),
        "mmdit": {**first_and_last(losses), "minutes": minutes(), "log": losses[::10]},
    }
    shutil.rmtree(model / "transformer")
    shutil.copytree(out / "run" / "transformer", model / "transformer")
    report["minutes"] = minutes()
    writing.write_json(out / "report.json", report)
    return measure(c, log=lambda m: log(f"[{minutes()} min] {m}"))


def share_with(folder: Path, base: Path) -> list[str]:
    """Replace each file of `folder` that is byte-equal to a file in the same component folder of `base` (e.g.
    text_encoder/model-00001-of-00002.safetensors and text_encoder/model.safetensors) by a relative link to
    it: the committed nano Edit folder keeps one copy of what it shares with checkpoints/nano. The two must be
    different pipeline folders side by side, which is where the loaders read such links
    (weights.linked_to_a_sibling_pipeline). -> the linked files, relative to `folder`."""
    folder, base = Path(folder), Path(base)
    if folder.resolve().parent != base.resolve().parent or folder.resolve() == base.resolve():
        raise ValueError(f"{folder} and {base} must be two different folders side by side (one parent)")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    linked = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
            continue
        part = base / path.parent.relative_to(folder)
        same = [
            p
            for p in sorted(part.glob("*"))
            if p.is_file() and not p.is_symlink() and digest(p) == digest(path)
        ]
        if same:
            path.unlink()
            path.symlink_to(os.path.relpath(same[0], path.parent))
            linked.append(str(path.relative_to(folder)))
    return linked


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m qwenimage_minimal train-nano-edit", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default=NanoEditConfig.out, help="work folder (default %(default)s)")
    p.add_argument(
        "--base", default=NanoEditConfig.base, help="the nano text-to-image model (default checkpoints/nano)"
    )
    p.add_argument("--quick", action="store_true", help="a CI-sized run (a minute): tiny data, 40 steps")
    p.add_argument("--overwrite", action="store_true", help="replace a finished model in --out")
    a = p.parse_args(argv)
    c = NanoEditConfig(out=a.out, base=a.base, **(QUICK_EDIT if a.quick else {}))
    try:
        return build(c, overwrite=a.overwrite)
    except (ValueError, OSError, weights.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None

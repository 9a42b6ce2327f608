"""The nano model measured as committed: stored in bf16, then scored from pixels (scenes.evaluate, a nano
GenEval) on held-out prompts, per checkpoint of both MMDiT runs, and at several CFG scales and step counts."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .. import checkpoints, images, mmdit, pipeline, weights, writing
from .. import vae as vae_file
from . import NanoConfig, scenes
from .vae_training import psnr


def measure(c: NanoConfig, log=print) -> dict:
    """The recipe's last stage, on <out> as build left it: the model stored in bf16 (half the bytes: what is
    committed), then measured as stored. Writes <out>/model/report.json (what the notebook and README show)
    and <out>/model/training/samples_over_training.png. -> the report.

    vae.held_out_psnr_bf16   the stored VAE's reconstruction PSNR on held-out scenes
    progress                 the held-out scores of every checkpoint of both MMDiT runs, against their minutes
    quality.held_out         c.eval_scenes held-out scenes, c.eval_steps steps, CFG c.eval_cfg: the headline
    quality.train_like       as many scenes of the training split's kind (not the training scenes themselves)
    quality.held_out_at      the held-out scenes at the CFG scales c.eval_cfg_neighbours (the choice of eval_cfg)
    quality.table            CFG scales and step counts, on c.table_scenes held-out scenes"""
    start = time.time()
    out = Path(c.out)
    model = out / "model"
    report = weights.read_config(out, "report.json")
    report["config"] = dataclasses.asdict(c)  # the measuring settings may differ from the build's
    store_in_bf16(model)
    report["vae"].update(vae_scores(model, c.held_out_pictures, seed=c.seed + 1, size=c.size))
    log(f"stored in bf16; the VAE: {report['vae']['stored']}")

    probe = scenes.make_scenes(c.progress_scenes, seed=c.seed + 4, split="held_out")
    report["progress"], pictures = scores_over_training(
        out, probe, steps=c.eval_steps, cfg=c.eval_cfg, size=c.size, log=log
    )
    (model / "training").mkdir(exist_ok=True)
    grid = images.picture_grid(
        [p for row in pictures for p in row[:4]],
        [f"step {r['step']}" for r in report["progress"] for _ in range(4)],
        columns=4,
    )
    images.save_image(grid, model / "training" / "samples_over_training.png")

    pipe = pipeline.QwenImagePipeline.from_pretrained(
        model, dtype=torch.float32
    )  # stored in bf16, computed in fp32
    quality = {}
    for split, seed in (("held_out", c.seed + 3), ("train", c.seed + 5)):
        quality[split if split == "held_out" else "train_like"] = evaluate(
            pipe,
            scenes.make_scenes(c.eval_scenes, seed=seed, split=split),
            steps=c.eval_steps,
            cfg=c.eval_cfg,
            size=c.size,
        )
        log(
            f"{split}: "
            + ", ".join(
                f"{k} {v:.3f}" for k, v in quality[split if split == "held_out" else "train_like"].items()
            )
        )
    quality["held_out_at"] = {  # the same held-out scenes at the neighbouring scales: how eval_cfg was chosen
        f"{cfg:g}": evaluate(
            pipe,
            scenes.make_scenes(c.eval_scenes, seed=c.seed + 3, split="held_out"),
            steps=c.eval_steps,
            cfg=cfg,
            size=c.size,
        )
        for cfg in c.eval_cfg_neighbours
    }
    quality["table"] = quality_table(
        pipe, scenes.make_scenes(c.table_scenes, seed=c.seed + 3, split="held_out"), size=c.size, log=log
    )
    report["quality"] = quality
    report["diversity"] = diversity(
        pipe,
        scenes.make_scenes(c.diversity_captions, seed=c.seed + 7, split="held_out", two_object_fraction=0),
        steps=c.eval_steps,
        size=c.size,
        log=log,
    )
    report["scores"] = quality["held_out"]
    rows = checkpoints.read_log(out / "run" / "log.jsonl")
    report["mmdit"]["log"] = [r for r in rows if r["step"] % 10 == 0]  # every 10th step: the curve, small
    if "refine" in report["mmdit"]:  # the warm restart's curve
        rows = checkpoints.read_log(out / "refine_run" / "log.jsonl")
        report["mmdit"]["refine"]["log"] = [r for r in rows if r["step"] % 10 == 0]
    report["measure_minutes"] = round((time.time() - start) / 60, 2)
    writing.write_json(out / "report.json", report)
    writing.write_json(model / "report.json", report)
    return report


def store_in_bf16(folder) -> None:
    """Rewrite every safetensors file of a model folder with its floating-point tensors in bf16 (each file
    replaced atomically). The nano model is committed so: half the bytes of fp32; the pipelines load the
    weights into fp32 on the CPU, so only the rounding of the weights changes (measured after, in build)."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        tensors = load_file(path)
        tensors = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
        writing.write_safetensors(
            path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], tensors.values()
        )


@torch.no_grad()
def vae_scores(model_folder, n: int, seed: int, size: int = 128) -> dict:
    """A model folder's VAE as stored, from the posterior mean: {"stored": {"held_out_psnr" (dB, held-out
    scenes), "outside_psnr" (scenes with colours and shapes the training split never has: brown, black, grey,
    stars), "outside_colour" (the share of those objects whose colour the scorer reads back right from the
    reconstruction: brown must come back brown)}}."""
    autoencoder = vae_file.load(Path(model_folder) / "vae", dtype=torch.float32).eval()
    held_out = scenes.pictures_of(scenes.make_scenes(n, seed=seed, split="held_out"), size)
    outside = scenes.outside_scenes(n, seed=seed)
    pictures = scenes.pictures_of(outside, size)
    rebuilt = autoencoder.decode(autoencoder.encode(pictures).mean)
    return {
        "stored": {
            "held_out_psnr": psnr(autoencoder.decode(autoencoder.encode(held_out).mean), held_out),
            "outside_psnr": psnr(rebuilt, pictures),
            "outside_colour": scenes.evaluate(images.postprocess(rebuilt, "pil"), outside)["colour"],
        }
    }


def evaluate(
    pipe,
    scene_list,
    steps: int = 20,
    cfg: float = NanoConfig.eval_cfg,
    size: int = 128,
    seed: int = 0,
    batch: int = 16,
    pictures: list | None = None,
    negative_prompt: str = NanoConfig.eval_negative,
) -> dict:
    """Draw the scenes' captions with the pipeline (`steps` Euler steps, CFG scale `cfg` against
    `negative_prompt`; 1 = no guidance) and score the pictures from their pixels (scenes.evaluate). Batch i's
    noise comes from seed + i. The pictures are appended to `pictures` if given."""
    drawn = []
    for i in range(0, len(scene_list), batch):
        part = scene_list[i : i + batch]
        drawn += pipe(
            prompt=[scenes.caption(s) for s in part],
            negative_prompt=negative_prompt if cfg > 1 else None,
            true_cfg_scale=cfg,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + i),
            progress=False,
        ).images
    if pictures is not None:
        pictures += drawn
    return scenes.evaluate(drawn, scene_list)


TABLE_SETTINGS = (
    (1.0, 20, ""),
    (1.5, 20, ""),
    (2.0, 20, ""),
    (3.0, 20, ""),
    (4.0, 20, ""),
    (6.0, 20, ""),
    (2.0, 5, ""),
    (2.0, 10, ""),
    (2.0, 40, ""),
    (2.0, 20, " "),
    (4.0, 20, " "),
)  # (CFG, steps, negative)


def quality_table(pipe, scene_list, settings=TABLE_SETTINGS, size: int = 128, log=print) -> list[dict]:
    """The scores at several (CFG scale, steps, negative prompt) settings on the same scenes and noise: what
    guidance, the step count and the negative prompt do. -> [{"cfg", "steps", "negative", **scores}]"""
    rows = []
    for cfg, steps, negative in settings:
        rows.append(
            {
                "cfg": cfg,
                "steps": steps,
                "negative": negative,
                **evaluate(pipe, scene_list, steps=steps, cfg=cfg, size=size, negative_prompt=negative),
            }
        )
        log(
            ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) and k not in ("cfg",) else f"{k} {v}"
                for k, v in rows[-1].items()
            )
        )
    return rows


def scores_over_training(
    work, scene_list, steps: int = 20, cfg: float = NanoConfig.eval_cfg, size: int = 128, log=print
) -> tuple[list[dict], list]:
    """The scores of every checkpoint that train.py kept in <work>/run and then <work>/refine_run (the MMDiT
    after 3000, 6000, ... steps, the warm restart's counted on from the first run's last), drawn on the same
    scenes and noise: how quality grows with training time.
    -> ([{"step", "minutes" (MMDiT training only), **scores}], [the pictures of each checkpoint])"""
    work = Path(work)
    pipe = pipeline.QwenImagePipeline.from_pretrained(work / "model", dtype=torch.float32)
    rows, pictures = [], []
    step_before, seconds_before = 0, 0.0
    for run in (work / "run", work / "refine_run"):
        if not run.is_dir():
            continue
        log_rows = checkpoints.read_log(run / "log.jsonl")
        seconds = {r["step"]: r["seconds"] for r in log_rows if "seconds" in r}
        for folder in checkpoints.checkpoints_in(run):
            step = checkpoints.checkpoint_step(folder)
            pipe.transformer = mmdit.load(folder / "transformer", dtype=torch.float32).eval()
            drawn = []
            rows.append(
                {
                    "step": step_before + step,
                    "minutes": round((seconds_before + seconds.get(step, float("nan"))) / 60, 2),
                    **evaluate(pipe, scene_list, steps=steps, cfg=cfg, size=size, pictures=drawn),
                }
            )
            pictures.append(drawn)
            log(
                f"step {rows[-1]['step']}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k != "step")
            )
        step_before += max((r["step"] for r in log_rows), default=0)
        seconds_before += max(seconds.values(), default=0.0)
    return rows, pictures


def placement(picture, thing) -> tuple[float, float, float] | None:
    """(x, y, side) in pixels of the largest blob of the object's colour: its centre and the square root of its
    area; None if there is none."""
    labels = scenes.colour_map(picture)
    found = scenes.blobs(labels == list(scenes.ALL_COLOURS).index(thing.colour) + 1, min_pixels=4)
    if not found:
        return None
    ys, xs = found[0].nonzero()
    return float(xs.mean()), float(ys.mean()), float(len(xs)) ** 0.5


def spread(pictures, thing) -> dict:
    """The standard deviations (pixels) of the object's centre (x and y averaged) and side over pictures of one
    caption, read back from the pixels as `placement` reads them."""
    found = np.array([p for p in (placement(x, thing) for x in pictures) if p is not None])
    if len(found) < 2:
        return {"centre": 0.0, "side": 0.0}
    std = found.std(0)
    return {"centre": float((std[0] + std[1]) / 2), "side": float(std[2])}


def diversity(
    pipe,
    scene_list,
    seeds: int = 16,
    cfgs=(1.0, 1.5, 2.0, 3.0, 4.0),
    steps: int = 20,
    size: int = 128,
    log=print,
) -> list[dict]:
    """How much the model's pictures of one caption differ between seeds, against how much the data's do: for
    each single-object scene, `seeds` pictures drawn at each CFG scale and `seeds` pictures `vary` draws of the
    same caption, their spreads (`spread`) compared. -> [{"cfg", "centre_ratio", "side_ratio", "accuracy"}]:
    the model's spread over the data's, averaged over the scenes (1 = as varied as the data), and the share of
    the drawn pictures the scorer finds right."""
    single = [s.named() for s in scene_list if len(s.things) == 1]
    data = [
        spread([scenes.render(scenes.vary(s, random.Random(k)), size) for k in range(seeds)], s.things[0])
        for s in single
    ]
    rows = []
    for cfg in cfgs:
        ratios, right = {"centre": [], "side": []}, []
        for s, truth in zip(single, data):
            drawn = pipe(
                prompt=[scenes.caption(s)] * seeds,
                negative_prompt=NanoConfig.eval_negative if cfg > 1 else None,
                true_cfg_scale=cfg,
                height=size,
                width=size,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                progress=False,
            ).images
            model = spread(drawn, s.things[0])
            for key in ratios:
                ratios[key].append(model[key] / max(truth[key], 1e-6))
            right.append(scenes.evaluate(drawn, [s] * seeds)["single_object"])
        rows.append(
            {
                "cfg": cfg,
                "centre_ratio": float(np.mean(ratios["centre"])),
                "side_ratio": float(np.mean(ratios["side"])),
                "accuracy": float(np.mean(right)),
            }
        )
        log(", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()))
    return rows


def inpainting_cases(n: int, seed: int = 0) -> list[tuple[scenes.Scene, scenes.Scene]]:
    """n (source, target) pairs: a varied training-split scene of one object, and the scene its inpainting
    prompt asks for: that object as named plus one of HELD_OUT_OBJECTS (in turn) in another cell, in another
    colour. Every target is held out (scenes.is_held_out): the model never saw its caption."""
    rng = random.Random(seed)
    held = sorted(scenes.HELD_OUT_OBJECTS)
    pool = scenes.make_scenes(20 * n, seed=seed, two_object_fraction=0.0)
    cases = []
    for i in range(n):
        colour, shape, position = held[i % len(held)]
        fits = [s for s in pool if s.things[0].position != position and s.things[0].colour != colour]
        source = fits[rng.randrange(len(fits))]
        added = scenes.Thing(colour, shape, position, rng.choice(sorted(scenes.SIZES)))
        cases.append((source, scenes.Scene((source.named().things[0], added))))
    return cases


def as_pil(array: np.ndarray):
    """An (H, W, 3) float picture in [0, 1] (a pipeline's "np" output) as the PIL image "pil" would give."""
    return Image.fromarray((array * 255).round().astype("uint8"))


def inpainting(
    pipe,
    cases,
    steps: int = 20,
    cfg: float = NanoConfig.eval_cfg,
    margin: int = 6,
    grow: int = 8,
    seed: int = 0,
    size: int = 128,
    pictures=None,
) -> dict:
    """Each source picture inpainted (strength 1, `steps` steps, CFG `cfg` against "") inside the cell of the
    target's new object and `margin` pixels around it (scenes.cell_mask: room for an object drawn near its
    cell's edge), prompted with the target's caption; read back from the pixels:

    added       the share where the new object is entirely right (colour, shape, cell)
    kept        the share where the source's object is still entirely right
    outside     the mean difference (0..255 pixel values, the largest of the three channels) between a result
                and its picture's VAE round trip (the same posterior draw, decoded) outside the cell grown by
                `margin` + `grow` pixels. The loop keeps the latents there equal to the picture's, so what
                differs is only the decoder's reach across the mask's edge (its convolutions, and the attention
                of its middle block, which sees every position)
    round_trip  the mean difference there between the round trip and the picture itself: the VAE's own error,
                the yardstick for `outside`
    The results (PIL) are appended to `pictures` if given."""
    added, kept, outside, round_trip_error = [], [], [], []
    for source, target in cases:
        picture, new = scenes.render(source, size), target.things[1]
        drawn = pipe(
            prompt=scenes.caption(target),
            negative_prompt="" if cfg > 1 else None,
            true_cfg_scale=cfg,
            image=picture,
            mask_image=scenes.cell_mask(new.position, size, margin),
            height=size,
            width=size,
            strength=1.0,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            progress=False,
        ).images[0]  # (H, W, 3) in [0, 1]
        draw = pipe.picture_latents(picture, size, size, torch.Generator().manual_seed(seed), 1)
        round_trip = pipe.decode(draw, size, size, "np").images[0]  # the posterior draw the call started from
        far = np.asarray(scenes.cell_mask(new.position, size, margin + grow)) == 0  # (H, W)
        outside.append(np.abs(drawn - round_trip).max(-1)[far].mean() * 255)
        exact = np.asarray(picture, np.float32) / 255
        round_trip_error.append(np.abs(round_trip - exact).max(-1)[far].mean() * 255)
        image = as_pil(drawn)
        verdicts = scenes.score(image, target)
        kept.append(verdicts[0]["correct"])
        added.append(verdicts[1]["correct"])
        if pictures is not None:
            pictures.append(image)
    return {
        "added": float(np.mean(added)),
        "kept": float(np.mean(kept)),
        "outside": float(np.mean(outside)),
        "round_trip": float(np.mean(round_trip_error)),
    }


def strength_table(
    pipe, pairs, strengths, steps: int = 20, cfg: float = NanoConfig.eval_cfg, size: int = 128, pictures=None
):
    """img2img (SDEdit) of each (source, target) pair: the source picture, the target's caption, at each
    strength (20 steps, CFG against ""); -> [{"strength", "steps_run", "prompt", "source", "change"}]: the
    share where the target's object is entirely right, where the source's still is, and the mean |change|
    of the pixels (0..255) from the source. The pictures of each strength are appended to `pictures` (a
    list per strength) if given."""
    rows = []
    sources = [scenes.render(s, size) for s, _ in pairs]
    for strength in strengths:
        drawn = [
            pipe(
                prompt=scenes.caption(target.named()),
                negative_prompt="" if cfg > 1 else None,
                true_cfg_scale=cfg,
                image=picture,
                height=size,
                width=size,
                strength=strength,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                progress=False,
            ).images[0]
            for picture, (_, target) in zip(sources, pairs)
        ]
        change = [
            np.abs(np.asarray(d, np.float32) - np.asarray(x, np.float32)).mean()
            for d, x in zip(drawn, sources)
        ]
        rows.append(
            {
                "strength": strength,
                "steps_run": len(pipeline.strength_schedule(torch.zeros(steps + 1), strength)) - 1,
                "prompt": scenes.evaluate(drawn, [t.named() for _, t in pairs])["single_object"],
                "source": scenes.evaluate(drawn, [s.named() for s, _ in pairs])["single_object"],
                "change": float(np.mean(change)),
            }
        )
        if pictures is not None:
            pictures.append(drawn)
    return rows

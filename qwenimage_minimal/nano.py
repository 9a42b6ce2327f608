"""The nano model: Qwen-Image's own architecture at a size a CPU trains from scratch, on scenes it draws.

    scenes.py  captioned pictures of coloured shapes (some combinations held out of training)
    1. the VAE learns to reconstruct them            train_vae: reconstruction + a small KL term
    2. its latents get their per-channel statistics  latent_statistics -> vae/config.json latents_mean/std
    3. the MMDiT learns flow matching on the latents  train.py (full fine-tuning from random init, caption
                                                      dropout so that CFG works)
    4. the folder is stored in bf16 and measured     measure: scenes.evaluate (a nano GenEval) on held-out
                                                      prompts, per checkpoint, at several CFG scales and step
                                                      counts -> model/report.json

The text encoder stays at its random initialisation (frozen, as Qwen-Image's is frozen too): a random
2-layer Qwen2.5-VL still maps different words to different vectors, and the MMDiT learns to read them.
The latents have 4 channels, not the official 16 (sizes.SIZES["nano"]): on the same recipe the MMDiT placed
held-out objects right 42% of the time after 2,000 steps with 4 channels, 19% after 3,000 with 16.

    python -m qwenimage_minimal train-nano [--out out/nano] [--quick]      (make nano, about 50 CPU minutes;
                                                                             out/nano/model is checkpoints/nano)
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .vae import QwenImageVAE

NEAR_DETERMINISTIC_LOGVAR = -8.0   # initial posterior log-variance: the decoder starts on clean latents
COMMITTED = Path(__file__).resolve().parent.parent / "checkpoints" / "nano"   # the trained model, in git

# `demo`'s prompts: the first four are combinations the training split allows, the last four never appear in it
# (scenes.HELD_OUT_OBJECTS: a red triangle at the top left, a blue circle at the bottom right; HELD_OUT_PAIRS:
# red with blue, green with yellow)
DEMO_PROMPTS = (
    "a large red circle at the top left",
    "a small blue square in the center",
    "a large green triangle at the bottom right",
    "a large yellow diamond at the left and a large purple circle at the right",
    "a large red triangle at the top left",
    "a large blue circle at the bottom right",
    "a large red square at the top and a large blue circle at the bottom",
    "a large green diamond at the left and a large yellow square at the right",
)


def object_mask(pictures: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W) bool: the pixels that are not background."""
    return (pictures - background.view(1, 3, 1, 1)).abs().amax(1) > 0.05


def object_crops(pictures, mask, crop: int, batch: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random crop x crop windows, each around a random object pixel (jittered by a quarter crop):
    most of a scene is background, which a VAE learns in seconds; the shapes' edges are the hard part."""
    n, _, height, width = pictures.shape
    xs, ms = [], []
    for i in torch.randint(0, n, (batch,), generator=generator).tolist():
        ys, xs_ = mask[i].nonzero(as_tuple=True)
        k = int(torch.randint(0, len(ys), (1,), generator=generator)) if len(ys) else None
        cy, cx = (int(ys[k]), int(xs_[k])) if k is not None else (height // 2, width // 2)
        jy, jx = (torch.randint(-crop // 4, crop // 4 + 1, (2,), generator=generator)).tolist()
        top = min(max(cy - crop // 2 + jy, 0), height - crop)
        left = min(max(cx - crop // 2 + jx, 0), width - crop)
        xs.append(pictures[i, :, top:top + crop, left:left + crop])
        ms.append(mask[i, top:top + crop, left:left + crop])
    return torch.stack(xs), torch.stack(ms)


def vae_loss(vae: QwenImageVAE, x, mask, generator, object_weight: float, kl_weight: float):
    """Reconstruction (L1 + L2, object pixels weighted up) of a posterior sample + kl_weight * KL to N(0, I).
    -> (loss, reconstruction term, KL) for the log."""
    mean, logvar = vae.encode_moments(x).chunk(2, dim=1)                         # (B, z, h, w) each
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise                      # reparameterised sample
    error = vae.decode_unclamped(z) - x                                            # (B, 3, H, W)
    w = 1 + object_weight * mask[:, None].to(x.dtype)
    reconstruction = ((error.abs() + error.pow(2)) * w).sum() / (w.sum() * 3)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return reconstruction + kl_weight * kl, reconstruction, kl


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((reconstruction - target) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def train_vae(vae: QwenImageVAE, pictures: torch.Tensor, held_out: torch.Tensor, background, steps: int,
              batch: int = 16, crop: int = 64, lr: float = 1e-3, object_weight: float = 10.0,
              kl_weight: float = 1e-6, seed: int = 0, eval_every: int = 100, log=print) -> list[dict]:
    """Train `vae` in place on `pictures` (N, 3, H, W) in [-1, 1]; every `eval_every` steps the held-out
    reconstruction PSNR (from the posterior mean, as the pipelines encode) is logged. -> the log rows.

    AdamW, warmup then cosine decay. The posterior starts nearly deterministic (NEAR_DETERMINISTIC_LOGVAR):
    with the default init its noise (std 1) would drown the latents the decoder learns from."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.as_tensor(background, dtype=pictures.dtype)
    mask = object_mask(pictures, background)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.z_dim:] += NEAR_DETERMINISTIC_LOGVAR
        vae.quant_conv.weight[vae.config.z_dim:] *= 0.01
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    # 50 steps of warmup, then a cosine down to a tenth: the loss is noisy at a constant rate (held-out
    # PSNR swings by 2-3 dB between evaluations), the decay settles it
    shape = lambda s: min(1.0, (s + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
    rows = []
    for step in range(1, steps + 1):
        x, m = object_crops(pictures, mask, crop, batch, generator)
        loss, reconstruction, kl = vae_loss(vae.train(), x, m, generator, object_weight, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        row = {"step": step, "loss": loss.item(), "reconstruction": reconstruction.item(), "kl": kl.item()}
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                row["held_out_psnr"] = psnr(vae.eval().decode(vae.encode(held_out).mean), held_out)
            log(f"vae step {step}: loss {row['loss']:.4f}, held-out PSNR {row['held_out_psnr']:.2f} dB")
        rows.append(row)
    return rows


@torch.no_grad()
def latent_statistics(vae: QwenImageVAE, pictures: torch.Tensor, batch: int = 64) -> tuple[tuple, tuple]:
    """Per-channel mean and standard deviation of the posterior means over `pictures`: the official VAE's
    config carries the same two vectors (latents_mean, latents_std), with which the pipelines normalise
    latents to about unit scale before the MMDiT sees them. -> (means, stds) as tuples of floats."""
    z = torch.cat([vae.encode(pictures[i:i + batch]).mean for i in range(0, len(pictures), batch)])  # (N, C, h, w)
    return tuple(z.mean((0, 2, 3)).tolist()), tuple(z.std((0, 2, 3)).tolist())


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

@dataclass
class NanoConfig:
    """Every setting of the recipe; QUICK (below) is the CI-sized run, the defaults the committed model's."""
    out: str = "out/nano"               # data/, vae/ log, run/ (train.py's output), model/ (the checkpoint)
    seed: int = 0
    size: int = 128                     # pixels: 4 x 16 x 16 latents, 64 image tokens
    train_scenes: int = 4000
    vae_steps: int = 3000               # 16 CPU minutes: held-out PSNR 28.9 dB
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    dit_steps: int = 10000              # 30 CPU minutes (scores against minutes: checkpoints/nano/README.md)
    dit_batch: int = 16
    dit_lr: float = 1e-3                # warmup, then a cosine to 0
    dit_weighting: str = "logit_normal"  # timesteps mostly at middle noise levels (SD3, Esser et al. 2024)
    dit_checkpoint_every: int = 2000    # run/checkpoint-N/transformer: scores against minutes
    caption_dropout: float = 0.1        # the empty prompt's share: what CFG's unconditional branch learns from
    vae_eval_every: int = 200           # steps between held-out PSNR measurements
    held_out_pictures: int = 32         # held-out scenes for the VAE's PSNR
    eval_scenes: int = 200              # held-out scenes drawn and scored at the end (as many training-like ones)
    table_scenes: int = 96              # held-out scenes for the CFG scale / step count table
    progress_scenes: int = 48           # held-out scenes drawn with every checkpoint of the MMDiT run
    eval_steps: int = 20
    eval_cfg: float = 2.0               # measured best (checkpoints/nano/README.md: CFG x steps table)
    eval_negative: str = ""             # CFG's negative prompt: the empty one that caption dropout trained
                                        # (the official " " is a prompt this model never saw: CFG 4 then fails)


QUICK = dict(size=64, train_scenes=64, vae_steps=150, vae_batch=16, vae_crop=32, vae_lr=1e-3, vae_eval_every=150,
             held_out_pictures=8, dit_steps=100, dit_batch=8, dit_checkpoint_every=100, eval_scenes=4, table_scenes=4,
             progress_scenes=4, eval_steps=4)


def first_and_last(losses: list) -> dict:
    """The mean loss of the first and of the last tenth of a run (single steps are too noisy to compare)."""
    tenth = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth}


def pictures_of(scene_list, size: int) -> torch.Tensor:
    from . import images, scenes
    return torch.cat([images.to_tensor(scenes.render(s, size)) for s in scene_list])       # (N, 3, H, W)


def build(c: NanoConfig, log=print) -> dict:
    """Run the recipe; -> a report (losses, PSNR, scores, minutes). The model is written to <out>/model."""
    from . import scenes, sizes, train, vae as vae_file, weights
    start = time.time()
    minutes = lambda: round((time.time() - start) / 60, 2)
    out = Path(c.out)
    weights.check_writable_folder(out, f"--out {out}")
    for leftover in ("data", "run", "model"):            # a fresh run: nothing of an earlier one is mixed in
        shutil.rmtree(out / leftover, ignore_errors=True)
    report = {"config": dataclasses.asdict(c)}

    # 0. data: the training scenes as a captioned folder (what train.py reads), a held-out set for the VAE
    train_scenes = scenes.write_dataset(out / "data", c.train_scenes, seed=c.seed, split="train", size=c.size)
    held_out = pictures_of(scenes.make_scenes(c.held_out_pictures, seed=c.seed + 1, split="held_out"), c.size)
    log(f"[{minutes()} min] {len(train_scenes)} training scenes in {out / 'data'}")

    # 1. a random nano Qwen-Image in the official layout; 2. its VAE trained, its latent statistics measured
    model = sizes.write_checkpoint(out / "model", "nano", seed=c.seed)
    autoencoder = vae_file.load(model / "vae")
    pictures = pictures_of(train_scenes, c.size)
    background = torch.tensor(scenes.BACKGROUND, dtype=torch.float32) / 127.5 - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        rows = train_vae(autoencoder, pictures, held_out, background, c.vae_steps, batch=c.vae_batch, crop=c.vae_crop,
                         lr=c.vae_lr, seed=c.seed, eval_every=c.vae_eval_every,
                         log=lambda m: log(f"[{minutes()} min] {m}"))
    mean, std = latent_statistics(autoencoder.eval(), pictures[:1000])
    config = dataclasses.replace(autoencoder.config, latents_mean=mean, latents_std=std)
    sizes.save_tensors(autoencoder, model / "vae" / f"{vae_file.WEIGHTS_STEM}.safetensors")
    weights.write_json(model / "vae" / "config.json", config.to_json())
    report["vae"] = {**first_and_last([r["reconstruction"] for r in rows]), "held_out_psnr": rows[-1]["held_out_psnr"],
                     "minutes": minutes(), "log": rows}

    # 3. the MMDiT, from its random init, by the project's training loop
    settings = train.TrainConfig(
        model=str(model), data=str(out / "data"), out=str(out / "run"), resolution=c.size, square=True,
        finetune="full", mixed_precision="no", learning_rate=c.dit_lr, lr_scheduler="cosine",
        weighting_scheme=c.dit_weighting, lr_warmup_steps=min(100, c.dit_steps // 4), train_batch_size=c.dit_batch,
        max_train_steps=c.dit_steps, caption_dropout=c.caption_dropout, adam_weight_decay=0.0, seed=c.seed,
        checkpointing_steps=min(c.dit_checkpoint_every, c.dit_steps),
        validation_prompt=tuple(scenes.caption(s) for s in scenes.make_scenes(4, seed=c.seed + 2, split="held_out")),
        validation_steps=max(1, c.dit_steps // 4), validation_inference_steps=c.eval_steps,
        validation_cfg=c.eval_cfg)
    log(f"[{minutes()} min] training the MMDiT: {c.dit_steps} steps of {c.dit_batch}")
    train.train(settings)
    report["mmdit"] = {**first_and_last([r["loss"] for r in train.read_log(out / "run" / "log.jsonl")]),
                       "minutes": minutes()}
    shutil.rmtree(model / "transformer")
    shutil.copytree(out / "run" / "transformer", model / "transformer")

    report["minutes"] = minutes()
    weights.write_json(out / "report.json", report)
    return measure(c, log=lambda m: log(f"[{minutes()} min] {m}"))


def measure(c: NanoConfig, log=print) -> dict:
    """The recipe's last stage, on <out> as build left it: the model stored in bf16 (half the bytes: what is
    committed), then measured as stored. Writes <out>/model/report.json (what the notebook and README show)
    and <out>/model/training/samples_over_training.png. -> the report.

    vae.held_out_psnr_bf16   the stored VAE's reconstruction PSNR on held-out scenes
    progress                 the held-out scores of every checkpoint of the MMDiT run, against its minutes
    quality.held_out         c.eval_scenes held-out scenes, c.eval_steps steps, CFG c.eval_cfg: the headline
    quality.train_like       as many scenes of the training split's kind (not the training scenes themselves)
    quality.table            CFG scales and step counts, on c.table_scenes held-out scenes"""
    from . import images, pipeline, scenes, train, weights
    start = time.time()
    out = Path(c.out)
    model = out / "model"
    report = weights.read_config(out, "report.json")
    report["config"] = dataclasses.asdict(c)                 # the measuring settings may differ from the build's
    store_in_bf16(model)
    report["vae"]["held_out_psnr_bf16"] = vae_psnr(model, c.held_out_pictures, seed=c.seed + 1, size=c.size)
    log(f"stored in bf16; the VAE's held-out PSNR {report['vae']['held_out_psnr_bf16']:.2f} dB")

    probe = scenes.make_scenes(c.progress_scenes, seed=c.seed + 4, split="held_out")
    report["progress"], pictures = scores_over_training(out, probe, steps=c.eval_steps, cfg=c.eval_cfg, size=c.size,
                                                        log=log)
    (model / "training").mkdir(exist_ok=True)
    grid = images.labelled_grid([p for row in pictures for p in row[:4]],
                                [f"step {r['step']}" for r in report["progress"] for _ in range(4)], columns=4)
    images.save_image(grid, model / "training" / "samples_over_training.png")

    pipe = pipeline.QwenImagePipeline.from_pretrained(model, dtype=torch.float32)   # stored in bf16, computed in fp32
    quality = {}
    for split, seed in (("held_out", c.seed + 3), ("train", c.seed + 5)):
        quality[split if split == "held_out" else "train_like"] = evaluate(
            pipe, scenes.make_scenes(c.eval_scenes, seed=seed, split=split), steps=c.eval_steps, cfg=c.eval_cfg,
            size=c.size)
        log(f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in quality[split if split == 'held_out'
                                                                        else 'train_like'].items()))
    quality["table"] = quality_table(pipe, scenes.make_scenes(c.table_scenes, seed=c.seed + 3, split="held_out"),
                                     size=c.size, log=log)
    report["quality"] = quality
    report["scores"] = quality["held_out"]
    rows = train.read_log(out / "run" / "log.jsonl")
    report["mmdit"]["log"] = [r for r in rows if r["step"] % 10 == 0]      # every 10th step: the curve, small
    report["measure_minutes"] = round((time.time() - start) / 60, 2)
    weights.write_json(out / "report.json", report)
    weights.write_json(model / "report.json", report)
    return report


def store_in_bf16(folder) -> None:
    """Rewrite every safetensors file of a model folder with its floating-point tensors in bf16 (each file
    replaced atomically). The nano model is committed so: half the bytes of fp32; the pipelines load the
    weights into fp32 on the CPU, so only the rounding of the weights changes (measured after, in build)."""
    from safetensors.torch import load_file

    from . import weights
    for path in sorted(Path(folder).rglob("*.safetensors")):
        tensors = load_file(path)
        tensors = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
        weights.write_safetensors(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], tensors.values())


@torch.no_grad()
def vae_psnr(model_folder, n: int, seed: int, size: int = 128) -> float:
    """The held-out reconstruction PSNR (dB) of a model folder's VAE, from the posterior mean."""
    from . import scenes, vae as vae_file
    autoencoder = vae_file.load(Path(model_folder) / "vae", dtype=torch.float32).eval()
    pictures = pictures_of(scenes.make_scenes(n, seed=seed, split="held_out"), size)
    return psnr(autoencoder.decode(autoencoder.encode(pictures).mean), pictures)


def evaluate(pipe, scene_list, steps: int = 20, cfg: float = NanoConfig.eval_cfg, size: int = 128, seed: int = 0,
             batch: int = 16, pictures: list | None = None, negative_prompt: str = NanoConfig.eval_negative) -> dict:
    """Draw the scenes' captions with the pipeline (`steps` Euler steps, CFG scale `cfg` against
    `negative_prompt`; 1 = no guidance) and score the pictures from their pixels (scenes.evaluate). Batch i's
    noise comes from seed + i. The pictures are appended to `pictures` if given."""
    from . import scenes
    drawn = []
    for i in range(0, len(scene_list), batch):
        part = scene_list[i:i + batch]
        drawn += pipe(prompt=[scenes.caption(s) for s in part], negative_prompt=negative_prompt if cfg > 1 else None,
                      true_cfg_scale=cfg, height=size, width=size, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(seed + i), progress=False).images
    if pictures is not None:
        pictures += drawn
    return scenes.evaluate(drawn, scene_list)


TABLE_SETTINGS = ((1.0, 20, ""), (1.5, 20, ""), (2.0, 20, ""), (3.0, 20, ""), (4.0, 20, ""), (6.0, 20, ""),
                  (2.0, 5, ""), (2.0, 10, ""), (2.0, 40, ""), (2.0, 20, " "), (4.0, 20, " "))   # (CFG, steps, negative)


def quality_table(pipe, scene_list, settings=TABLE_SETTINGS, size: int = 128, log=print) -> list[dict]:
    """The scores at several (CFG scale, steps, negative prompt) settings on the same scenes and noise: what
    guidance, the step count and the negative prompt do. -> [{"cfg", "steps", "negative", **scores}]"""
    rows = []
    for cfg, steps, negative in settings:
        rows.append({"cfg": cfg, "steps": steps, "negative": negative,
                     **evaluate(pipe, scene_list, steps=steps, cfg=cfg, size=size, negative_prompt=negative)})
        log(", ".join(f"{k} {v:.3f}" if isinstance(v, float) and k not in ("cfg",) else f"{k} {v}"
                      for k, v in rows[-1].items()))
    return rows


def scores_over_training(work, scene_list, steps: int = 20, cfg: float = NanoConfig.eval_cfg, size: int = 128,
                         log=print) -> tuple[list[dict], list]:
    """The scores of every checkpoint that train.py kept in <work>/run (the MMDiT after 1500, 3000, ... steps,
    fp32 as trained), drawn on the same scenes and noise: how quality grows with training time.
    -> ([{"step", "minutes" (MMDiT training only), **scores}], [the pictures of each checkpoint])"""
    from . import mmdit, pipeline, train
    work = Path(work)
    pipe = pipeline.QwenImagePipeline.from_pretrained(work / "model", dtype=torch.float32)
    seconds = {r["step"]: r["seconds"] for r in train.read_log(work / "run" / "log.jsonl") if "seconds" in r}
    rows, pictures = [], []
    for folder in train.checkpoints_in(work / "run"):
        step = train.checkpoint_step(folder)
        pipe.transformer = mmdit.load(folder / "transformer", dtype=torch.float32).eval()
        drawn = []
        rows.append({"step": step, "minutes": round(seconds.get(step, float("nan")) / 60, 2),
                     **evaluate(pipe, scene_list, steps=steps, cfg=cfg, size=size, pictures=drawn)})
        pictures.append(drawn)
        log(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k != "step"))
    return rows, pictures


def main(argv=None) -> dict:
    import argparse
    p = argparse.ArgumentParser(prog="python -m qwenimage_minimal train-nano", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=NanoConfig.out, help="work folder; the model is written to OUT/model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a CI-sized run (about a minute): losses fall, nothing more")
    a = p.parse_args(argv)
    return build(NanoConfig(out=a.out, seed=a.seed, **(QUICK if a.quick else {})))

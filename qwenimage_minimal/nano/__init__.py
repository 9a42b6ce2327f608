"""The nano world: Qwen-Image's own architecture at a size a CPU trains from scratch, on scenes it draws.

    scenes.py     captioned pictures of coloured shapes (some combinations held out of training) and a scorer
                  that reads them back from pixels (a nano GenEval)
    vae_training.py  1. the VAE learns to reconstruct them; 2. its latents get their per-channel statistics
    recipe.py     3. the MMDiT learns flow matching on the latents through train.py (full fine-tuning from
                  random init, caption dropout so that CFG works), then once more from its average on new
                  scenes at a lower learning rate (a warm restart); the whole recipe, `build`
    measure.py    4. the folder is stored in bf16 and measured: held-out prompts scored per checkpoint, at
                  several CFG scales and step counts -> model/report.json

This file holds what the recipe, the command line, the tests and the lessons share: the recipe's settings
(NanoConfig, QUICK), where the trained model is committed (COMMITTED) and `demo`'s prompts.

The text encoder stays at its random initialisation (frozen, as Qwen-Image's is frozen too): a random
2-layer Qwen2.5-VL still maps different words to different vectors, and the MMDiT learns to read them.
The latents have 4 channels, not the official 16 (sizes.SIZES["nano"]): on the same recipe the MMDiT placed
held-out objects right 42% of the time after 2,000 steps with 4 channels, 19% after 3,000 with 16.

    python -m qwenimage_minimal train-nano [--out out/nano] [--quick]      (make nano, about 70 CPU minutes;
                                                                             out/nano/model is checkpoints/nano)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COMMITTED = Path(__file__).resolve().parents[2] / "checkpoints" / "nano"  # the trained model, in git
COMMITTED_EDIT = (
    COMMITTED.parent / "nano_edit"
)  # the nano Edit model fine-tuned from it (edit_recipe.py), in git

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


@dataclass
class NanoConfig:
    """Every setting of the recipe; QUICK (below) is the CI-sized run, the defaults the committed model's."""

    # data/, run/ (train.py's output), refine_data/ and refine_run/ (the warm restart's), model/ (the checkpoint)
    out: str = "out/nano"
    seed: int = 0
    size: int = 128  # pixels: 4 x 16 x 16 latents, 64 image tokens
    train_scenes: int = 4000
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    dit_steps: int = 12000  # scores against minutes: checkpoints/nano/README.md
    dit_batch: int = 16
    dit_lr: float = 1e-3  # warmup, then a cosine to 0
    dit_weighting: str = "logit_normal"  # timesteps mostly at middle noise levels (SD3, Esser et al. 2024)
    dit_checkpoint_every: int = 3000  # run/checkpoint-N/transformer: scores against minutes
    # a warm restart (SGDR, Loshchilov & Hutter 2017): from the first run's average, a second cosine at a lower
    # peak on new scenes, with the VAE and text encoder as committed (bf16). Measured against 12,000 steps alone:
    # held-out two-object scenes 77% -> 90% (checkpoints/nano/README.md); 0: none
    dit_refine_steps: int = 8000
    dit_refine_lr: float = 3e-4
    dit_refine_scenes: int = 4000
    caption_dropout: float = 0.1  # the empty prompt's share: what CFG's unconditional branch learns from
    dit_ema_decay: float = 0.999  # train.py --use_ema: the average of the last ~1000 steps (0: off)
    vae_other_pictures: int = 2000  # pictures unlike the scenes, for a general VAE (other_pictures)
    vae_eval_every: int = 500  # steps between held-out PSNR measurements
    held_out_pictures: int = 32  # held-out scenes for the VAE's PSNR
    eval_scenes: int = 200  # held-out scenes drawn and scored at the end (as many training-like ones)
    table_scenes: int = 64  # held-out scenes for the CFG scale / step count table
    progress_scenes: int = 48  # held-out scenes drawn with every checkpoint of the MMDiT run
    diversity_captions: int = 4  # single-object held-out captions drawn with 16 seeds at several CFG scales
    eval_steps: int = 20
    # measured best on the eval scenes against its neighbours (report.json: quality.held_out_at)
    eval_cfg: float = 3.0
    eval_cfg_neighbours: tuple = (2.0, 4.0)
    eval_negative: str = ""  # CFG's negative prompt: the empty one that caption dropout trained


QUICK = dict(
    size=64,
    train_scenes=64,
    vae_other_pictures=32,
    vae_steps=400,
    vae_batch=16,
    vae_crop=32,
    vae_lr=1e-3,
    vae_eval_every=400,
    held_out_pictures=8,
    dit_steps=100,
    dit_batch=8,
    dit_checkpoint_every=100,
    dit_refine_steps=20,
    dit_refine_scenes=16,
    eval_scenes=4,
    table_scenes=4,
    progress_scenes=4,
    diversity_captions=1,
    eval_steps=4,
    eval_cfg_neighbours=(),
)

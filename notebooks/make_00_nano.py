"""Writes 00_nano.ipynb (unexecuted): the notebook's source, kept as a script so that its diffs stay readable.

    python notebooks/make_00_nano.py && jupyter nbconvert --to notebook --execute --inplace notebooks/00_nano.ipynb
"""

from pathlib import Path

import nbformat

cells = []
md = lambda text: cells.append(nbformat.v4.new_markdown_cell(text.strip()))
code = lambda text: cells.append(nbformat.v4.new_code_cell(text.strip()))
# an exercise's solution: collapsed, tagged, and checked with course.check against an independent value
solution = lambda text: cells.append(nbformat.v4.new_code_cell(
    text.strip(), metadata={"jupyter": {"source_hidden": True}, "tags": ["solution"]}))

md(r"""
# 00 · nano Qwen-Image: the real architecture, trained from scratch on a CPU

The official 20 B weights cannot be downloaded here, and a model with random weights draws noise. So this
notebook trains one: notebooks 02, 04 and 05 then load the result (`checkpoints/nano`), while 06, 07 and 08
run tiny random-weight models, which exercise the code (editing, LoRA, training) but draw noise. Karpathy's
nanoGPT [2] made the point for language models: a course needs a model small enough to train on a laptop,
whose samples visibly get better. `qwenimage_minimal/nano.py` does it for Qwen-Image [1]:

* **the same code**: the MMDiT, the VAE and the Qwen2.5-VL text encoder are the project's classes (the ones
  that load the official checkpoints), at a small size from the size table (`sizes.SIZES["nano"]`); the
  real Qwen2 tokenizer and chat template; the folder is the official layout, and diffusers'
  `QwenImagePipeline` loads it and draws the same latents (the appendix checks it);
* **data it draws itself**: captioned scenes of coloured shapes (`scenes.py`), some combinations never
  shown in training, so that we can ask whether the model *composes* what it learnt;
* **a yardstick that reads pixels**: a nano GenEval [3], which decides from the picture whether each
  object of the caption is there, in its colour, shape and place;
* **the project's own training loop** (`train.py`, notebook 08): flow matching, caption dropout for CFG.

### What you will learn

* what each of Qwen-Image's three networks (text encoder, VAE, MMDiT) is for, by training two of them;
* why a diffusion model works in a VAE's latent space, and what a VAE must learn first;
* what flow-matching training looks like from the outside: the loss, and samples that improve;
* how to measure whether a text-to-image model follows its prompt, and whether it composes;
* what classifier-free guidance, its negative prompt and the step count do to the samples.

### Before you start

**Prerequisites:** PyTorch. This is the first notebook; 01–08 then open each component.

**Run time / needs:** a few minutes on 2 CPU cores, most of it in the two live training cells (each prints
its time); nothing to download.
The committed model in `checkpoints/nano` was trained by `make nano` (the same recipe at full length, about
50 CPU minutes); set `TRAIN_FULL = True` to retrain it here instead of loading it. The appendix compares
with diffusers.

In order: 1. the data and the yardstick; 2. the VAE learning to reconstruct; 3. the MMDiT learning to draw
(live, small, then the committed run's record); 4. prompts it never saw; 5. what CFG and the step count do.
""")

code(r"""
import json
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

import course
from qwenimage_minimal import images, mmdit, nano, pipeline, scenes, sizes, train
from qwenimage_minimal.vae import QwenImageVAE

TRAIN_FULL = False          # True: run the whole recipe (make nano, about 50 CPU minutes) and use its model below
torch.set_num_threads(2)
work = Path(tempfile.mkdtemp())
if TRAIN_FULL:
    nano.build(nano.NanoConfig(out=str(work / "full")))
MODEL = work / "full" / "model" if TRAIN_FULL else nano.COMMITTED
report = json.loads((MODEL / "report.json").read_text())
print("the model:", MODEL, sorted(p.name for p in MODEL.iterdir()))
""")

md(r"""
### What "nano" means

Qwen-Image has three networks [1]: a **text encoder** (Qwen2.5-VL's language model) that turns the prompt
into vectors, a **VAE** that compresses pictures into latents and back, and an **MMDiT** that turns noise into
latents, reading the prompt's vectors. The nano size is a row of the same table that holds the official one.
Widths and depths shrink, and the latents have 4 channels instead of 16 (a config value: the official code
reads it, diffusers too); the rest (the 8x compression, the 2 x 2 patches, the 3-axis RoPE, the vocabulary
of 151,680 tokens, the template) stays.

Why 4 channels: flat-coloured shapes carry little information, and the MMDiT learnt a 4-channel latent space
faster than a 16-channel one: on the same recipe, held-out objects were in the right place 42% of the time
after 2,000 MMDiT steps with 4 channels, 19% after 3,000 with 16 (`nano.py`'s docstring). The text encoder is
32 wide because its embedding table has a row per token of the real vocabulary: 151,680 x 32 in bf16 is
9.7 MB, the biggest tensor of the model.
""")

code(r"""
def parameters(module):
    return sum(p.numel() for p in module.parameters())

from qwenimage_minimal.text_encoder import TextEncoder
for name in ("nano", "official"):
    size = sizes.SIZES[name]
    t, d, v = size.text_encoder, size.transformer, size.vae
    print(f"{name:8s} text encoder {t.num_hidden_layers:2d} layers x {t.hidden_size:4d} wide | MMDiT {d.num_layers:2d} "
          f"blocks x {d.num_attention_heads * d.attention_head_dim:4d} wide | VAE base {v.base_dim:3d}, "
          f"{v.z_dim} latent channels")
with torch.device("meta"):
    nano_parts = {"text encoder": TextEncoder(sizes.SIZES["nano"].text_encoder),
                  "MMDiT": mmdit.MMDiT(sizes.SIZES["nano"].transformer), "VAE": QwenImageVAE(sizes.SIZES["nano"].vae)}
layout = [p for part in ("model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")
          for p in ([MODEL / part] if part.endswith(".json") else (MODEL / part).rglob("*")) if p.is_file()]
print({k: f"{parameters(m) / 1e6:.2f} M" for k, m in nano_parts.items()},
      f"- the official-layout files (bf16, with the tokenizer): {sum(p.stat().st_size for p in layout) / 1e6:.1f} MB")
""")

md(r"""
## 1 · The data, and a yardstick that reads pixels

A scene is one or two objects on a plain background: each a colour (8), a shape (4), a size (2) and a cell
of a 3 x 3 grid (9). The caption says all of it in plain English. Everything is drawn with PIL from a seed.

Two kinds of combination **never appear in training** (`scenes.HELD_OUT_OBJECTS`, `HELD_OUT_PAIRS`): six
(colour, shape, position) triples such as a red triangle at the top left, although red things, triangles and
the top left are all seen; and four colour pairs never together in a two-object scene. A model that draws
them composes; one that only recalls cannot.
""")

code(r"""
train_scenes = scenes.make_scenes(4000, seed=0, split="train")
held_out = scenes.make_scenes(8, seed=2, split="held_out")
picture = scenes.render(train_scenes[0], 128)
print("a caption:", repr(scenes.caption(train_scenes[0])))
print("PIL", picture.size, "-> images.to_tensor ->", tuple(images.to_tensor(picture).shape), "in [-1, 1]")
print("held-out objects:", sorted(scenes.HELD_OUT_OBJECTS)[:3], "...")
print("held-out colour pairs:", sorted(tuple(sorted(p)) for p in scenes.HELD_OUT_PAIRS))
print("held-out scenes among the 4000 training scenes:", sum(scenes.is_held_out(s) for s in train_scenes))
course.tiles([scenes.render(s, 128) for s in train_scenes[:4] + held_out[:4]],
             [scenes.caption(s) for s in train_scenes[:4]] + ["[held out] " + scenes.caption(s) for s in held_out[:4]],
             title="training scenes (top), held-out scenes (bottom)")
""")

md(r"""
**The yardstick.** The Qwen-Image report measures prompt following with GenEval among other benchmarks
[1]. GenEval runs an object detector on each picture and checks the objects, colours, counts and positions
a prompt asks for [3]. Here no network is needed: every pixel is assigned to the nearest palette colour
(`scenes.colour_map`), each colour's pixels are split into connected blobs, and the largest blob of the
stated colour is judged for shape and position:

* shape, from how much of its bounding box it fills: a square ~1, a circle ~$\pi/4$ = 0.79, a triangle and a
  diamond ~1/2, told apart by where the widest row is;
* position, from the grid cell of its centroid.

Because the shape and the place are judged on the blob *of the stated colour*, the scorer checks **attribute
binding**: that each colour sits on the shape the caption gives it. Ask for "a red circle and a blue square"
and get a blue circle and a red square: a detector that only checks "is there a circle, is there something
red" passes it; this scorer fails it, because the red blob is a square (the second cell below tries it).
Objects the caption does not mention are not looked for, so an extra object costs nothing.

A yardstick must first be right on the truth: on rendered ground-truth scenes it must score >= 98%, or it
would be the bottleneck.
""")

code(r"""
labels = scenes.colour_map(picture)                              # (H, W): 0 background, i + 1 the i-th colour
print("colour map", labels.shape, "values", np.unique(labels))
palette = matplotlib.colors.ListedColormap(np.array([scenes.BACKGROUND, *scenes.COLOURS.values()]) / 255)
palette.set_under("black")                                       # -1: far from every palette colour
fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.3), dpi=72, layout="constrained")
axes[0].imshow(picture); axes[0].set_title(scenes.caption(train_scenes[0]), fontsize=8)
shown = axes[1].imshow(labels, cmap=palette, vmin=-0.5, vmax=len(scenes.COLOURS) + 0.5, interpolation="nearest")
axes[1].set_title("scenes.colour_map: the nearest palette colour's index", fontsize=8)
bar = fig.colorbar(shown, ax=axes[1], ticks=range(len(scenes.COLOURS) + 1))
bar.ax.set_yticklabels([f"{i} {name}" for i, name in enumerate(["background", *scenes.COLOURS])], fontsize=7)
for ax in axes: ax.axis("off")
plt.show()
print("verdicts:", scenes.score(picture, train_scenes[0]))
""")

code(r"""
swapped = scenes.render(scenes.parse_caption("a large blue circle at the left and a large red square at the right"),
                        128)                             # the colours of the caption below, swapped
asked_for = scenes.parse_caption("a large red circle at the left and a large blue square at the right")
for thing, verdict in zip(asked_for.things, scenes.score(swapped, asked_for)):
    print(f"asked a {thing.colour} {thing.shape}, drawn swapped:", verdict)
truth = scenes.make_scenes(150, seed=3) + scenes.make_scenes(60, seed=4, split="held_out")
accuracy = scenes.evaluate([scenes.render(s, 128) for s in truth], truth)
print({k: round(v, 3) for k, v in accuracy.items()})
assert min(accuracy.values()) >= 0.98
""")

md(r"""
## 2 · The VAE learns to reconstruct

**Why a VAE at all.** Running the diffusion model on pixels is wasteful: most of an image's bits are detail
that a small decoder can restore. Latent diffusion [4] trains an autoencoder once, then the diffusion model
works on its compressed latents. Qwen-Image's VAE compresses 8x in each direction into 16 channels; the
MMDiT's 2 x 2 patches then make a 1328² picture 83 x 83 = 6,889 tokens instead of 1.76 M pixels. The nano
VAE compresses 8x into 4 channels (0.8 M parameters instead of 127 M). It is trained here, with
`nano.train_vae`:

* a reconstruction loss, L1 + L2, with **object pixels weighted 11 times the background** and crops
  **centred on objects**: most of a scene is background, which a VAE learns in seconds; the shapes' edges
  are what is hard;
* a **small KL term** (1e-6) towards N(0, I), the variational autoencoder's regulariser [5], kept weak so
  that the latents stay a distribution with a sensible scale without blurring the reconstructions;
* the posterior's log-variance **starts at -8**: with the default initialisation the sampling noise (std 1)
  would drown the latents the decoder learns from.

Live, a fresh VAE for 300 steps on 64 px pictures (the committed one had 3,000 at 128 px, 16 CPU minutes).
Do not expect a smooth climb. The committed run's log (`report.json`, printed and plotted below) reached
21.9 dB of held-out PSNR at step 400, fell back to 15–17.5 dB and stayed there until step 1,200, then jumped
to 25 dB at step 1,400 and passed the 28 dB goal at step 2,000. Its loss fell in steps too: about 0.6 until
step 600, about 0.4 until step 1,200, then tenfold by step 1,500. The two need not move together (the PSNR
fell from step 400 to 800 while the loss fell): the loss weights object pixels 11 times and is measured on
training crops, the PSNR weights every pixel alike, on held-out scenes.
""")

code(r"""
# live: 64 px pictures (the VAE is convolutional: the same network on a quarter of the pixels, so that 300 steps
# fit in a few CPU minutes)
vae_pictures = nano.pictures_of(train_scenes[:300], 64)              # (300, 3, 64, 64)
vae_scenes = scenes.make_scenes(16, seed=1, split="held_out")
vae_held_out = nano.pictures_of(vae_scenes, 64)                     # (16, 3, 64, 64)
background = torch.tensor(scenes.BACKGROUND, dtype=torch.float32) / 127.5 - 1
torch.manual_seed(0)
fresh_vae = QwenImageVAE(sizes.SIZES["nano"].vae)
with torch.no_grad():
    before = fresh_vae.decode(fresh_vae.encode(vae_held_out).mean)
t0 = time.perf_counter()
rows = nano.train_vae(fresh_vae, vae_pictures, vae_held_out, background, steps=300, batch=16, crop=32, lr=1e-3,
                      eval_every=100)
print(f"300 VAE steps in {time.perf_counter() - t0:.0f} s")
with torch.no_grad():
    after = fresh_vae.eval().decode(fresh_vae.encode(vae_held_out).mean)
""")

code(r"""
committed_log = report["vae"]["log"]
print("committed run, held-out PSNR (dB) by step:",
      ", ".join(f"{r['step']}: {r['held_out_psnr']:.1f}" for r in committed_log if "held_out_psnr" in r))
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
axes[0].plot([r["reconstruction"] for r in rows], lw=0.6, label="live, 300 steps (64 px)")
axes[0].plot([r["reconstruction"] for r in committed_log], lw=0.6, alpha=0.6, label="committed run (128 px)")
axes[0].set_yscale("log"); axes[0].set_xlabel("step"); axes[0].set_ylabel("weighted L1 + L2")
axes[0].set_title("reconstruction loss"); axes[0].legend()
for log, label in ((rows, "live (64 px)"), (committed_log, "committed run (128 px)")):
    points = [(r["step"], r["held_out_psnr"]) for r in log if "held_out_psnr" in r]
    axes[1].plot(*zip(*points), "o-", label=label)
axes[1].axhline(28, color="grey", ls="--", lw=0.8); axes[1].set_xlabel("step"); axes[1].set_ylabel("dB")
axes[1].set_title("held-out PSNR (goal 28 dB)"); axes[1].legend(); fig.tight_layout(); plt.show()
print(f"live VAE, held-out PSNR: {nano.psnr(before, vae_held_out):.1f} dB untrained -> "
      f"{nano.psnr(after, vae_held_out):.1f} dB after 300 steps")
course.tiles(images.postprocess(torch.cat([vae_held_out[:4], before[:4], after[:4]]), "pil"),
             ["input"] * 4 + ["untrained"] * 4 + ["live, 300 steps"] * 4, width=1.8)
reading = scenes.evaluate(images.postprocess(after, "pil"), vae_scenes)    # the yardstick, on the reconstructions
print(f"the scorer on the {len(vae_scenes)} live reconstructions: objects found in their colour "
      f"{reading['colour']:.0%}, in their place {reading['position']:.0%}, of their shape {reading['shape']:.0%}")
""")

md(r"""
**What the live VAE has learnt.** Compare the bottom row with the inputs: blurred blobs, in the right
places and of about the right size, but in approximate hues (a green or a yellow object can come out as
its neighbour on the colour wheel, blue or orange) and with soft edges. The scorer's reading (printed)
says the same: most objects are found in their colour and place, few of their shape. So the VAE learns
*where* first; the exact colours and the edges, which decide the shape, come later. The committed VAE,
after 3,000 steps at 128 px:
""")

code(r"""
committed_vae = pipeline.QwenImagePipeline.from_pretrained(MODEL, dtype=torch.float32).vae   # stored in bf16
big_held_out = nano.pictures_of(scenes.make_scenes(4, seed=1, split="held_out"), 128)
with torch.no_grad():
    latents = committed_vae.encode(big_held_out).mean                                     # (4, 4, 16, 16)
    best = committed_vae.decode(latents)
print("pictures", tuple(big_held_out.shape), "-> latents", tuple(latents.shape), "-> pictures", tuple(best.shape))
print(f"committed VAE (3,000 steps at 128 px), PSNR on these 4 pictures {nano.psnr(best, big_held_out):.1f} dB; on 32: "
      f"{report['vae']['held_out_psnr_bf16']:.1f} dB (report.json)")
course.tiles(images.postprocess(torch.cat([big_held_out, best]), "pil"), ["input"] * 4 + ["committed VAE"] * 4,
             width=1.8)
""")

md(r"""
**Latent statistics.** The official VAE's `config.json` carries a mean and a standard deviation per latent
channel (`latents_mean`, `latents_std`); the pipelines normalise latents with them before the MMDiT sees them,
so that the flow-matching path starts from data of about the noise's scale. The nano recipe measures them on
its own latents (`nano.latent_statistics`) and writes them into the same two fields.
""")

code(r"""
print("latents_mean", np.round(committed_vae.config.latents_mean, 2))
print("latents_std ", np.round(committed_vae.config.latents_std, 2))
""")

md(r"""
## 3 · The MMDiT learns to draw

**What it learns.** The MMDiT is a diffusion transformer [9] in SD3's two-stream form [8]: text and image
tokens keep their own weights and meet in joint attention. It is trained by flow matching [6, 7]: take a
picture's latents $x_0$ and noise $\varepsilon$, mix them at a random noise level $\sigma$,
$x_\sigma = (1-\sigma)x_0 + \sigma\varepsilon$, and regress the velocity $\varepsilon - x_0$ along that
straight line. Sampling then integrates the learnt velocity from pure noise down to $\sigma = 0$
(notebook 08 derives the loss, 05 steps through sampling).

The text encoder stays **frozen at its random initialisation**. Qwen-Image's fine-tuning recipes freeze it too
(at its trained weights; notebook 08). A random 2-layer Qwen2.5-VL still maps different words to different
vectors, and the MMDiT learns to read them. The MMDiT (6 blocks, 128 wide, 3.7 M parameters) starts from
random weights and is trained by `train.train` with full fine-tuning, exactly the loop of notebook 08: prompt
embeddings and VAE latents cached once, flow matching, and 10% of the captions replaced by the empty prompt.
That last part is **caption dropout** [10]: the same network then also learns the *unconditional* velocity,
which classifier-free guidance needs (section 5).

Live and small first: 300 steps of 16 on 1,000 scenes (a few minutes on 2 cores: the cell prints its time),
at a constant learning rate after a 50-step warm-up (`constant_with_warmup`). The live model is a fresh
random MMDiT in a folder with the **committed VAE and text encoder** copied in: the MMDiT learns to denoise
that VAE's latents (a random VAE's latents mean nothing, and its decoder draws noise) and to read that text
encoder's vectors, the same frozen random ones the committed MMDiT learnt to read, so the two runs differ
only in the MMDiT's training. The loss falls fast; the pictures after 300 steps are coloured blobs, often
not yet of the asked colour or in the asked place: compare them with the committed run's checkpoints below.
""")

code(r"""
live = sizes.write_checkpoint(work / "live", "nano", seed=1)        # a random nano Qwen-Image, official layout
for part in ("vae", "text_encoder"):                                 # ... with the committed VAE and text encoder
    shutil.rmtree(live / part); shutil.copytree(MODEL / part, live / part)
scenes.write_dataset(work / "data", 1000, seed=0)
settings = train.TrainConfig(model=str(live), data=str(work / "data"), out=str(work / "run"), resolution=128,
                             square=True, finetune="full", mixed_precision="no", learning_rate=1e-3,
                             lr_scheduler="constant_with_warmup", lr_warmup_steps=50, train_batch_size=16,
                             max_train_steps=300, caption_dropout=0.1, weighting_scheme="logit_normal",
                             checkpointing_steps=300, seed=0)
t0 = time.perf_counter()
train.train(settings, progress=False)
print(f"300 steps in {time.perf_counter() - t0:.0f} s")
live_log = train.read_log(work / "run" / "log.jsonl")
""")

code(r"""
full_log = report["mmdit"]["log"]                              # the committed run, every 10th step
fig, ax = plt.subplots(figsize=(8, 3))
smooth = lambda xs, k=25: np.convolve(xs, np.ones(k) / k, mode="valid")
live_steps = [r["step"] for r in live_log]
ax.plot(live_steps[12:-12], smooth([r["loss"] for r in live_log]), label="live, 300 steps")
ax.plot([r["step"] for r in full_log][4:-4], smooth([r["loss"] for r in full_log], 9), label="committed run")
ax.set_xscale("log"); ax.set_xlabel("step"); ax.set_ylabel("flow-matching loss (running mean)"); ax.legend()
fig.tight_layout(); plt.show()

shutil.rmtree(live / "transformer")                              # the trained MMDiT into the model folder,
shutil.copytree(work / "run" / "transformer", live / "transformer")  # as nano.build does
live_pipe = pipeline.QwenImagePipeline.from_pretrained(live, dtype=torch.float32)
probe = [scenes.caption(s) for s in train_scenes[:4]]
drawn = live_pipe(prompt=probe, negative_prompt="", true_cfg_scale=nano.NanoConfig.eval_cfg, height=128, width=128,
                  num_inference_steps=20, generator=torch.Generator().manual_seed(0), progress=False).images
course.tiles(drawn, probe, title="after 300 live steps")
""")

md(r"""
The committed run is the same loop, longer: 10,000 steps of 16 on 4,000 scenes, with a cosine learning-rate
decay after a 100-step warm-up (the live run: constant after its warm-up) and, in both, logit-normal
timesteps: most noise levels drawn from the middle, where the shapes are decided (SD3's comparison ranked
this density best on average [8]). `nano.scores_over_training` drew the same held-out prompts with each checkpoint it kept and scored them:
quality against MMDiT minutes (the VAE's 16 come before). 48 scenes per checkpoint, of which 23 are
two-object scenes (printed), so one scene moves the two-object score by about 4 points: from step 8,000 to
10,000 it rose by 3 scenes, too few to tell the two checkpoints apart. Below, samples of four held-out
prompts (columns) at those checkpoints (rows), each prompt above its column:
""")

code(r"""
progress = report["progress"]
scores = ("single_object", "two_objects", "colour", "shape", "position")
print(f"{'step':>6} {'minutes':>8} " + " ".join(f"{k:>15}" for k in scores))
for r in progress:
    print(f"{r['step']:6d} {r['minutes']:8.1f} " + " ".join(f"{r[k]:15.2f}" for k in scores))
probe_scenes = scenes.make_scenes(report["config"]["progress_scenes"], seed=report["config"]["seed"] + 4,
                                   split="held_out")                   # what nano.measure drew at each checkpoint
n_two = sum(len(s.things) == 2 for s in probe_scenes)
print(f"{len(probe_scenes)} held-out scenes per checkpoint, {n_two} of them two-object: one scene is "
      f"{100 / n_two:.1f} points of the two-object score")
columns = [scenes.caption(s) for s in probe_scenes[:4]]                 # the probe's first four
record = Image.open(MODEL / "training" / "samples_over_training.png")   # rows of 4 tiles: 128 px + a 15 px label
course.tiles([record.crop((128 * c, 143 * r, 128 * c + 128, 143 * r + 128))
              for r in range(len(progress)) for c in range(4)],
             [(columns[c] + ": " if r == 0 else "") + f"step {p['step']}"
              for r, p in enumerate(progress) for c in range(4)],
             width=1.9, title="held-out prompts (columns) at each checkpoint (rows)")
""")

md(r"""
## 4 · Prompts it never saw

The committed model, on the held-out combinations: single objects it never saw in that colour, shape and
place, and two-object scenes with colour pairs never together in training. The scorer's verdict is in each
label. The measured scores (200 held-out scenes, 20 steps, CFG 2 against the empty prompt: the recipe's
`eval_cfg`, `eval_negative`) are in `report.json`, printed below. Eight pictures are a small sample: on 200
scenes, about one two-object scene in six has an object wrong.

Look also at what the scorer does not see: an object the caption did not ask for. The scorer looks only
for the objects the caption names (section 1), so a picture with an extra object may still be OK. The cell
counts the blobs of every palette colour in each picture (with the scorer's own minimum size) and names the
pictures that hold more objects than their caption asks for.
""")

code(r"""
pipe = pipeline.QwenImagePipeline.from_pretrained(MODEL, dtype=torch.float32)      # the files are bf16: compute in fp32
asked = [scenes.caption(s) for s in held_out]
drawn = pipe(prompt=asked, negative_prompt="", true_cfg_scale=nano.NanoConfig.eval_cfg, height=128, width=128,
             num_inference_steps=20, generator=torch.Generator().manual_seed(0), progress=False).images
verdicts = [all(v["correct"] for v in scenes.score(p, s)) for p, s in zip(drawn, held_out)]
course.tiles(drawn, [("OK: " if ok else "WRONG: ") + a for a, ok in zip(asked, verdicts)], title="held-out prompts")
print({k: round(v, 3) for k, v in report["quality"]["held_out"].items()})
extra = []
for picture, scene, ok in zip(drawn, held_out, verdicts):
    index_map = scenes.colour_map(picture)
    min_pixels = max(4, index_map.size // 400)                       # the scorer's: specks below 0.25% don't count
    found = sum(len(scenes.blobs(index_map == i + 1, min_pixels)) for i in range(len(scenes.COLOURS)))
    if found > len(scene.things):
        extra.append(f"{found} blobs for {len(scene.things)} objects, {'OK' if ok else 'WRONG'}: "
                     f"{scenes.caption(scene)}")
print(f"pictures with more objects than their caption asks for: {len(extra)} of {len(drawn)}", *extra, sep="\n  ")
""")

md(r"""
## 5 · What guidance, the negative prompt and the step count do

**Classifier-free guidance** (CFG) [10] runs the MMDiT twice per step, with the prompt and with a negative
prompt, and extrapolates from the second towards the first: `neg + scale * (cond - neg)`. Scale 1 is no
guidance. Qwen-Image's pipeline then rescales each token's result to the norm of the conditional prediction
(`pipeline_qwenimage.py` in diffusers [11]; notebook 05 draws it), which keeps large scales from
over-saturating.

**The negative prompt must mean "nothing" to the model.** Caption dropout replaced 10% of the training
captions by the empty prompt "", so "" is the prompt whose velocity the model learnt as unconditional. The
official examples use " " (a space): right for the 20 B model, but to this one a prompt it never saw, whose
prediction is off in its own way. Guidance then amplifies that error, pushes the sampler off the latents the
decoder knows, and shapes swell into blobs. With "" a moderate scale does no harm (2 scored best, within the
noise of 1 and 1.5, so it is the recipe's setting), and more guidance hurts, more slowly. Same prompt, same
noise:
""")

code(r"""
prompt = "a large green diamond at the left and a large yellow square at the right"     # a held-out colour pair
settings_grid = [(1.0, 20, ""), (2.0, 20, ""), (4.0, 20, ""), (4.0, 20, " "), (2.0, 3, ""), (2.0, 5, ""), (2.0, 10, ""),
                 (2.0, 40, "")]
tiles_drawn = []
for cfg, steps, negative in settings_grid:
    tiles_drawn += pipe(prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg, height=128, width=128,
                        num_inference_steps=steps, generator=torch.Generator().manual_seed(1), progress=False).images
negative_name = {"": "empty", " ": "space"}
course.tiles(tiles_drawn, [f"CFG {c:g}" + ("" if c == 1 else f", negative: {negative_name[n]}") + f", {s} steps"
                           for c, s, n in settings_grid], title=prompt)
table_scenes = scenes.make_scenes(nano.NanoConfig.table_scenes, seed=3, split="held_out")      # what measure() drew
n_two = sum(len(s.things) == 2 for s in table_scenes)
print(f"measured on {len(table_scenes)} held-out scenes, {len(table_scenes) - n_two} single-object and {n_two} two-object "
      f"ones (report.json): one scene moves a score by {100 / (len(table_scenes) - n_two):.1f} / {100 / n_two:.1f} points")
for r in report["quality"]["table"]:
    print(f"  CFG {r['cfg']:3.1f} against {r['negative']!r:4s}, {r['steps']:2d} steps: single object "
          f"{r['single_object']:.2f}, two objects {r['two_objects']:.2f}, colour {r['colour']:.2f}, shape {r['shape']:.2f}, "
          f"position {r['position']:.2f}")
""")

md(r"""
Read the table with its sample size in mind (printed above: one scene is about 2 points). CFG 1, 1.5 and 2
differ by two or three two-object scenes, within the noise of 43; CFG 4 and 6 against "" lose single
objects and two-object scenes alike, and anything against " " loses much more. Fewer steps cost little
here: 5 steps score like 40 on two objects. Few Euler steps suffice when the learnt paths are nearly
straight (notebook 08), as they seem to be on scenes this simple.

## Where next

* `make nano` retrains the committed model (the numbers of `checkpoints/nano/report.json`, on this machine's
  2 CPU cores). `python -m qwenimage_minimal demo` draws with it, stage by stage.
* Notebook 05 steps through the sampling loop with this model: the predicted clean image at each step, and CFG.
* Notebooks 01–04 open the text encoder, the MMDiT, the scheduler and the VAE; 08 derives the training loss.
""")

md(r"""
## Exercises

### Exercise 1 · How many tokens does the MMDiT see?

The VAE compresses 8x in each direction into its latent channels (4 nano, 16 official); the MMDiT cuts the
latents into 2 x 2 patches, one token each. Section 2 printed the nano shapes for square 128 px pictures.
Predict the latents' shape (batch, channels, height, width) and the shape of the packed tokens
`mmdit.pack_latents(latents, 2)` (batch, tokens, values per token) for one picture:

* (a) nano, 64 high and 128 wide;
* (b) the official model at 1328 x 1328;
* (c) the official model at 16:9, 928 high and 1664 wide.

Check them against the package: build each VAE on the meta device
(`with torch.device("meta"): vae = QwenImageVAE(sizes.SIZES["official"].vae)`; meta tensors have shapes but no
data, so even the 127 M-parameter VAE costs no memory and no compute), encode `torch.empty(1, 3, H, W)` there,
pack the posterior's `.mean`, and compare with `course.check(what, torch.tensor(yours), torch.tensor(shape))`.
""")

solution(r"""
# Solution (collapsed: expand to see it)
def predict(channels, height, width):        # 8x down in the VAE, then 2 x 2 patches of `channels` values each
    latents = (1, channels, height // 8, width // 8)
    return latents, (1, (height // 16) * (width // 16), channels * 2 * 2)

for what, size, height, width in (("(a) nano, 64 x 128", "nano", 64, 128),
                                  ("(b) official, 1328 x 1328", "official", 1328, 1328),
                                  ("(c) official, 928 x 1664", "official", 928, 1664)):
    config = sizes.SIZES[size].vae
    latents_shape, tokens_shape = predict(config.z_dim, height, width)
    with torch.device("meta"):                       # shapes only: no weights in memory, nothing computed
        encoded = QwenImageVAE(config).encode(torch.empty(1, 3, height, width)).mean
        tokens = mmdit.pack_latents(encoded, 2)
    print(f"{what}: latents {tuple(encoded.shape)}, tokens {tuple(tokens.shape)}")
    course.check(f"{what}: latents", torch.tensor(latents_shape), torch.tensor(encoded.shape))
    course.check(f"{what}: tokens", torch.tensor(tokens_shape), torch.tensor(tokens.shape))
""")

md(r"""
### Exercise 2 · Be the scorer

Render "a large red circle at the top left" (`scenes.render(scenes.parse_caption(...), 128)`) and score the
picture against the caption "a large red square at the top right" (`scenes.score(picture, scene)`). First
predict the verdict: which of `present`, `colour`, `shape`, `position`, `correct` are true? (`present` and
`colour` come from the same test in `scenes.score`, "is there a blob of the stated colour", so they are
always equal.) Then measure what the shape test reads: the fraction of the red blob's bounding box that is
red. Check the verdict with `course.check` (as a tensor of 0/1) against `scenes.score`, and the fill against
the area of a circle in its bounding square, $\pi/4$, with `rtol=0.03`. Which shape does `scenes.blob_shape`
call that blob (read its fill thresholds there)?
""")

solution(r"""
# Solution (collapsed: expand to see it)
circle = scenes.render(scenes.parse_caption("a large red circle at the top left"), 128)
asked_scene = scenes.parse_caption("a large red square at the top right")
# red is there, but a circle and elsewhere
predicted = {"present": True, "colour": True, "shape": False, "position": False, "correct": False}
verdict, = scenes.score(circle, asked_scene)
keys = list(predicted)
course.check("the scorer's verdict", torch.tensor([predicted[k] for k in keys], dtype=torch.float64),
             torch.tensor([verdict[k] for k in keys], dtype=torch.float64))
red = scenes.colour_map(circle) == list(scenes.COLOURS).index("red") + 1                  # (128, 128) bool
ys, xs = np.nonzero(red)
fill = red.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
course.check("fill of the circle's bounding box", fill, math.pi / 4, rtol=0.03)
blob = scenes.blobs(red, max(4, red.size // 400))[0]                                      # the largest red blob
print(f"fill {fill:.3f} (pi / 4 = {math.pi / 4:.3f}): scenes.blob_shape calls the blob a {scenes.blob_shape(blob)}")
""")

md(r"""
### Exercise 3 · What guidance costs

Predict how many times the pipeline calls the MMDiT for one picture with (a) CFG 1, 20 steps, negative "";
(b) CFG 2, 20 steps, negative ""; (c) CFG 2, 10 steps, negative ""; (d) CFG 2, 20 steps and no negative
prompt (`negative_prompt=None`). Count the calls with a forward hook,
`pipe.transformer.register_forward_hook(lambda module, inputs, output: calls.append(1))` (remove it after),
and check your four numbers with `course.check`. Why does (a) not call it twice per step, and what does the
pipeline say about (d)?
""")

solution(r"""
# Solution (collapsed: expand to see it)
predicted = [20, 40, 20, 20]     # one call per step; two with CFG (scale > 1 and a negative prompt)
calls, counted = [], []
hook = pipe.transformer.register_forward_hook(lambda module, inputs, output: calls.append(1))
for run, (cfg, steps, negative) in zip("abcd", ((1.0, 20, ""), (2.0, 20, ""), (2.0, 10, ""), (2.0, 20, None))):
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(prompt="a large red circle at the top left", negative_prompt=negative, true_cfg_scale=cfg, height=128,
             width=128, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
             progress=False)
    counted.append(len(calls))
    for w in caught:                                 # each warning under the run that raised it
        print(f"({run}) the pipeline warns: {w.message}")
hook.remove()
course.check("MMDiT calls for (a), (b), (c), (d)", torch.tensor(predicted), torch.tensor(counted))
""")

md(r"""
<details><summary>Answer: why</summary>

At scale 1, `neg + 1 * (cond - neg)` is `cond` exactly: the negative pass would be thrown away, so the
pipeline skips it (as diffusers' does). Without a negative prompt there is nothing to extrapolate from, and
the scale does nothing: the pipeline warns. So CFG doubles the cost of sampling, which is one reason for
guidance-distilled models such as the Lightning LoRAs (notebook 07) that sample without it.
</details>
""")

md(r"""
## Appendix · Check against the reference: diffusers draws the same latents

The committed folder is the official layout, so diffusers' `QwenImagePipeline` loads it as it is (its
text encoder, VAE and transformer classes, its scheduler). Two held-out prompts, CFG 2 against "", 8 steps,
the same generator seed: the latents after the last step must agree to float32 rounding (as in
`tests/test_nano_model.py`).
""")

code(r"""
try:
    from diffusers import QwenImagePipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
except ImportError:
    print("diffusers not installed: parity check skipped")
else:
    diffusers_logging.set_verbosity_error(); transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar(); transformers_logging.disable_progress_bar()
    reference = QwenImagePipeline.from_pretrained(MODEL, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    common = dict(prompt=list(nano.DEMO_PROMPTS[6:8]), negative_prompt="", true_cfg_scale=2.0, height=128, width=128,
                  num_inference_steps=8, output_type="latent")
    expected = reference(generator=torch.Generator().manual_seed(0), **common).images
    ours = pipe(generator=torch.Generator().manual_seed(0), progress=False, **common).images     # (2, 64, 16)
    course.parity("nano latents after 8 steps, ours vs diffusers", ours, expected, tol=1e-5)
""")

md(r"""
## References

1. C. Wu et al. (Qwen Team), *Qwen-Image Technical Report*, 2025, [arXiv:2508.02324](https://arxiv.org/abs/2508.02324).
2. A. Karpathy, *nanoGPT*, [github.com/karpathy/nanoGPT](https://github.com/karpathy/nanoGPT).
3. D. Ghosh, H. Hajishirzi, L. Schmidt, *GenEval: An Object-Focused Framework for Evaluating Text-to-Image
   Alignment*, 2023, [arXiv:2310.11513](https://arxiv.org/abs/2310.11513).
4. R. Rombach, A. Blattmann, D. Lorenz, P. Esser, B. Ommer, *High-Resolution Image Synthesis with Latent Diffusion
   Models*, 2021, [arXiv:2112.10752](https://arxiv.org/abs/2112.10752).
5. D. P. Kingma, M. Welling, *Auto-Encoding Variational Bayes*, 2013, [arXiv:1312.6114](https://arxiv.org/abs/1312.6114).
6. Y. Lipman, R. T. Q. Chen, H. Ben-Hamu, M. Nickel, M. Le, *Flow Matching for Generative Modeling*, 2022,
   [arXiv:2210.02747](https://arxiv.org/abs/2210.02747).
7. X. Liu, C. Gong, Q. Liu, *Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow*, 2022,
   [arXiv:2209.03003](https://arxiv.org/abs/2209.03003).
8. P. Esser et al., *Scaling Rectified Flow Transformers for High-Resolution Image Synthesis* (SD3: the MMDiT,
   logit-normal timesteps), 2024, [arXiv:2403.03206](https://arxiv.org/abs/2403.03206).
9. W. Peebles, S. Xie, *Scalable Diffusion Models with Transformers* (DiT), 2022, [arXiv:2212.09748](https://arxiv.org/abs/2212.09748).
10. J. Ho, T. Salimans, *Classifier-Free Diffusion Guidance*, 2022, [arXiv:2207.12598](https://arxiv.org/abs/2207.12598)
    (training with the condition dropped, and the guided combination).
11. diffusers, `src/diffusers/pipelines/qwenimage/pipeline_qwenimage.py` (true CFG with the norm rescale),
    [github.com/huggingface/diffusers](https://github.com/huggingface/diffusers).
""")

nb = nbformat.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"}})
nbformat.write(nb, Path(__file__).with_name("00_nano.ipynb"))

"""The course's two capstones: your pieces at work in the trained nano model (checkpoints/nano), scored from pixels.

    python assignments/capstone.py pieces [--assignments FOLDER] [--n N] [--steps S]     (make capstone-pieces)
    python assignments/capstone.py lora [--assignments FOLDER] [--train-steps T] [--n N]  (make capstone-lora)

Your functions are read from assignments/ (or FOLDER, or $ASSIGNMENTS: ASSIGNMENTS=assignments/solutions runs
the reference solutions), as `make grade` reads them.

pieces  Your rope_table and apply_rope (lesson 02) and cfg_combine and euler_step (lesson 05) are put into the
        nano model and its sampling loop through the package's public hook (MMDiT.use_rope, the pipeline's
        `cfg_combine` and `euler_step` attributes), and the demo grid's prompts are drawn twice from the same
        noise: with the package's pieces and with yours. Both are scored by the nano scorer (nano/scenes.py)
        and saved side by side in out/capstone/pieces.png. PASS when the latents agree to TOLERANCE (the scores
        are printed beside them); otherwise each piece is tried alone, and the ones that change the picture
        are named.
lora    A rank-8 LoRA trained with your lora_forward (lesson 07), inside `LoRALinear` below, on the brown
        pictures of nano/brown.py, with the recipe of the committed checkpoints/nano_brown_lora.safetensors
        (brown.TRAIN_FLAGS) and the package's flow-matching loss; then brown objects in shapes and cells the
        LoRA never saw brown in are drawn and scored, as brown.measure_lora does, beside the committed LoRA.
"""

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qwenimage_minimal import images, lora, nano, pipeline, sampling, scheduler, train
from qwenimage_minimal.nano import brown, scenes
from qwenimage_minimal.nano import measure as nano_measure
from qwenimage_minimal.train_config import parse_args

ROOT = Path(__file__).resolve().parents[1]
# Latents (std ~1) drawn with a right solution differ from the package's only by float32 rounding: measured
# 7e-6 at most with every piece written another right way (the table in float64, the rotation in real
# arithmetic, the norms as square roots of sums, the step as x - (sigma - sigma_next) v), 32 prompts, 20 steps.
# Each typical mistake of wrong/ moves them by 3 or more on the demo grid (cfg_no_rescale 3.0, rope_halves 13,
# euler_sign 22: measured on the nano model before its warm restart, at CFG 2), while some of its pictures
# still score right: the latents catch what the scorer may not.
TOLERANCE = 1e-4
PIECES = {"rope_table": "rope", "apply_rope": "rope", "cfg_combine": "guidance", "euler_step": "guidance"}
LESSON = {"rope": "02, section 3", "guidance": "05", "lora_linear": "07"}
# A LoRA trained with a right lora_forward scores as the committed one up to the noise of a different data order
# and draws: on 32 prompts one picture is 3 points. 15 points below it is a LoRA that learnt less.
MARGIN = 0.15


class NotWritten(Exception):
    """A piece of the student's that cannot run: missing, or raising NotImplementedError."""


def load(name: str, folder: Path):
    """The student's module `name` (e.g. "rope") from `folder`, as the grader's conftest loads it."""
    path = folder / f"{name}.py"
    if not path.is_file():
        raise NotWritten(f"{path} does not exist: the assignment file is assignments/{name}.py")
    if str(ROOT) not in sys.path:  # the typical mistakes of assignments/wrong reuse assignments.solutions
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"student_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def student_pieces(folder: Path) -> dict:
    """{piece name: the student's function} for the pieces of capstone 1 whose module is in `folder` (a folder
    of wrong/ holds one module: the other's pieces stay the package's)."""
    if not folder.is_dir():
        raise NotWritten(
            f"--assignments {folder} is not a folder (from out/student the default, assignments/, is it)"
        )
    pieces = {}
    for module in sorted(set(PIECES.values())):
        if not (folder / f"{module}.py").is_file():
            print(f"({folder}/{module}.py does not exist: its pieces are the package's)")
            continue
        loaded = load(module, folder)
        pieces.update({piece: getattr(loaded, piece) for piece, m in PIECES.items() if m == module})
    if not pieces:  # otherwise both drawings would be the package's, and "equal" would say nothing
        raise NotWritten(
            f"{folder} holds neither rope.py nor guidance.py: there is nothing of yours to draw with"
        )
    return pieces


def nano_pipeline():
    """The committed nano model, stored in bf16 and computed in fp32 (as `demo` and the measurements run it)."""
    return pipeline.QwenImagePipeline.from_pretrained(nano.COMMITTED, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Capstone 1: your pieces in the nano model
# ---------------------------------------------------------------------------------------------


def swap_in(pipe, pieces: dict) -> None:
    """Draw with `pieces` ({name: function}); a piece not given is the package's own."""
    pipe.transformer.use_rope(table=pieces.get("rope_table"), apply=pieces.get("apply_rope"))
    pipe.cfg_combine = pieces.get("cfg_combine", sampling.cfg_combine)
    pipe.euler_step = pieces.get("euler_step", sampling.euler_step)


def draw(pipe, pieces: dict, scene_list, steps: int, seed: int = 0):
    """The scenes' captions drawn with `pieces` in one batch (the model's own size, CFG and negative prompt).
    -> (latents (n, N, C), PIL pictures). NotWritten when a piece raises NotImplementedError."""
    defaults = pipeline.read_pipeline_defaults(nano.COMMITTED)
    swap_in(pipe, pieces)
    try:
        latents = pipe(
            prompt=[scenes.caption(s) for s in scene_list],
            negative_prompt=defaults["negative_prompt"],
            true_cfg_scale=defaults["true_cfg_scale"],
            height=defaults["height"],
            width=defaults["width"],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            progress=False,
        ).images
    except NotImplementedError as e:
        raise NotWritten(f"not written yet (NotImplementedError: {e})") from None
    finally:
        swap_in(pipe, {})
    return latents, pipe.decode(latents, defaults["height"], defaults["width"], "pil").images


def failure(e: Exception) -> str:
    return str(e) if isinstance(e, NotWritten) else f"raised {type(e).__name__}: {e}"


def verdict(picture, scene) -> str:
    """'right', or what the scorer found wrong, object by object."""
    wrong = []
    for thing, v in zip(scene.things, scenes.score(picture, scene)):
        missed = [a for a in ("colour", "shape", "position") if not v[a]]
        if missed:
            wrong.append(f"{thing.colour} {thing.shape}: wrong " + ", ".join(missed))
    return "; ".join(wrong) or "right"


def same_scores(package: dict, yours: dict | None) -> bool:
    """Equal scores; nan (no scene of that kind) equals nan."""
    both_nan = lambda k: math.isnan(package[k]) and math.isnan(yours[k])
    return yours is not None and all(package[k] == yours[k] or both_nan(k) for k in package)


def compare_pieces(pipe, pieces: dict, scene_list, steps: int) -> dict:
    """Draw the scenes with the package's pieces and with `pieces`, all together and each alone.
    -> {"verdicts": (package's, yours) per scene, "scores": (package's, yours) of scenes.evaluate,
    "difference": the largest |latent difference| (inf when yours did not run), "error": why not,
    "alone": {piece: its difference alone, or the error it raised}, "suspects": the pieces to look at,
    "pictures": (package's, yours), "passed": bool}."""
    reference, pictures = draw(pipe, {}, scene_list, steps)
    out = {"alone": {}, "error": None, "pictures": (pictures, None)}
    try:
        latents, theirs = draw(pipe, pieces, scene_list, steps)
        out["difference"] = float((latents - reference).abs().max())
        out["pictures"] = (pictures, theirs)
    except Exception as e:  # a student's function may fail in any way: say how, without a traceback
        out["difference"], out["error"] = float("inf"), failure(e)
    mine = out["pictures"][1] or pictures
    out["verdicts"] = [(verdict(p, s), verdict(q, s)) for p, q, s in zip(pictures, mine, scene_list)]
    yours = scenes.evaluate(out["pictures"][1], scene_list) if out["pictures"][1] else None
    out["scores"] = (scenes.evaluate(pictures, scene_list), yours)
    # The verdict is the latents': within the tolerance a pixel can still fall on the other side of a scorer's
    # threshold, so equal scores are reported beside it, not required.
    out["passed"] = out["difference"] <= TOLERANCE
    out["same_scores"] = same_scores(*out["scores"])
    if not out["passed"]:  # which piece? each alone, the others the package's
        for name, fn in pieces.items():
            try:
                latents, _ = draw(pipe, {name: fn}, scene_list, steps)
                out["alone"][name] = float((latents - reference).abs().max())
            except Exception as e:
                out["alone"][name] = failure(e)
    out["suspects"] = [n for n, d in out["alone"].items() if isinstance(d, str) or d > TOLERANCE]
    return out


def report_pieces(out: dict, scene_list, folder: Path) -> None:
    print(f"{'prompt':<75} {'the package':<30} yours")
    for scene, (theirs, yours) in zip(scene_list, out["verdicts"]):
        print(f"{scenes.caption(scene):<75} {theirs:<30} {yours if out['pictures'][1] else '-'}")
    package, yours = out["scores"]
    print("\nscores (scenes.evaluate; nan: no scene of that kind)")
    for key in package:
        print(f"  {key:<16} {package[key]:6.3f}   {'-' if yours is None else format(yours[key], '6.3f')}")
    print(f"\nlargest latent difference: {out['difference']:.3g} (tolerance {TOLERANCE:g})")
    if out["error"]:
        print(f"your pieces did not run: {out['error']}")
    if out["passed"]:
        scored = (
            "and score the same"
            if out["same_scores"]
            else ("(a score differs: a pixel within the tolerance crossed one of the scorer's thresholds)")
        )
        print(f"PASS: your pieces ({folder}) draw what the package's draw, {scored}")
        return
    for name, d in out["alone"].items():
        said = d if isinstance(d, str) else f"latents differ by {d:.3g}"
        print(f"  {name} alone (the other pieces the package's): {said}")
    lessons = sorted({LESSON[PIECES[n]] for n in out["suspects"]})
    named = ", ".join(out["suspects"]) or "none alone (only together: look at all four)"
    print(f"FAIL: suspect {named}; see lesson {' and '.join(lessons) or '02 and 05'} and `make grade`")


def pieces_main(a) -> int:
    demo = [scenes.parse_caption(text) for text in nano.DEMO_PROMPTS]
    held_out = [s.named() for s in scenes.make_scenes(max(0, a.n - len(demo)), seed=3, split="held_out")]
    scene_list = (demo + held_out)[: a.n]
    print(
        f"capstone 1: the nano model draws {len(scene_list)} prompts ({min(a.n, len(demo))} of the demo grid) "
        f"in {a.steps} steps, with the package's pieces and with yours from {a.assignments}\n"
    )
    try:
        pieces = student_pieces(a.assignments)
    except (NotWritten, AttributeError) as e:
        print(f"FAIL: {e}")
        return 1
    start = time.perf_counter()
    out = compare_pieces(nano_pipeline(), pieces, scene_list, a.steps)
    report_pieces(out, scene_list, a.assignments)
    package, yours = out["pictures"]
    tiles, labels = [], []
    for i, scene in enumerate(scene_list):  # package | yours, two scenes a row
        for who, drawn in (("package", package), ("yours", yours)):
            if drawn is not None:
                tiles.append(drawn[i])
                said = f"{who}: {verdict(drawn[i], scene)}"
                labels.append(f"{scenes.caption(scene)} ({said})" if who == "package" else said)
    a.out.mkdir(parents=True, exist_ok=True)
    images.save_image(images.picture_grid(tiles, labels, columns=4, scale=2), a.out / "pieces.png")
    print(f"package | yours, side by side -> {a.out / 'pieces.png'} ({time.perf_counter() - start:.0f} s)")
    return 0 if out["passed"] else 1


# ---------------------------------------------------------------------------------------------
# Capstone 2: a LoRA trained with your lora_forward
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen nn.Linear with a rank-r adapter beside it, its forward your lora_forward:
    y = x W^T + b + (alpha / r) (x A^T) B^T. Only A and B train."""

    def __init__(self, base: nn.Linear, lora_forward, rank: int, alpha: float, generator=None):
        super().__init__()
        self.base, self.lora_forward, self.alpha = base, lora_forward, alpha
        # PEFT's "gaussian" start, as lora.add_adapter's: A ~ N(0, 1 / r²), and B = 0: the model starts unchanged
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / rank)  # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.lora_forward(x, self.base.weight, self.base.bias, self.A, self.B, self.alpha)


def put(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` is (an attribute, or an item of a Sequential)."""
    parent, _, leaf = name.rpartition(".")
    if leaf.isdigit():
        model.get_submodule(parent)[int(leaf)] = module
    else:
        setattr(model.get_submodule(parent), leaf, module)


def check_forward(lora_forward) -> float:
    """This file's LoRALinear with your lora_forward against the package's lora.LoRALinear, with the same A,
    B and alpha -> the largest difference. alpha != r here: the brown recipe's alpha = r = 8 would hide an
    alpha / r turned over."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40)
    yours = LoRALinear(base, lora_forward, rank=4, alpha=6.0, generator=g)
    B = torch.randn(40, 4, generator=g)  # (out, r): not zero, so that the adapter counts
    yours.B.data.copy_(B)
    theirs = lora.LoRALinear(base)
    theirs.add("check", yours.A.detach(), B, 6.0)
    x = torch.randn(3, 5, 24, generator=g)
    y_yours, y_theirs = yours(x), theirs(x)
    # The gradients too: a lora_forward that detaches A or B (or runs under no_grad) computes the right numbers
    # and trains nothing.
    cotangent = torch.randn(y_theirs.shape, generator=g)
    if not y_yours.requires_grad:
        raise NotWritten("your lora_forward's output has no gradient: do not detach A or B, nor use no_grad")
    y_yours.backward(cotangent)
    y_theirs.backward(cotangent)
    grads = [
        (yours.A.grad, theirs.lora_A["check"].weight.grad),
        (yours.B.grad, theirs.lora_B["check"].weight.grad),
    ]
    if any(mine is None for mine, _ in grads):
        raise NotWritten("no gradient reaches A or B through your lora_forward: do not detach them")
    difference = (y_yours - y_theirs).abs().max()
    return float(max([difference, *((mine - ref).abs().max() for mine, ref in grads)]))


def brown_data(pipe, folder: Path):
    """brown.write_data's pictures (brown objects, and base-colour scenes so that nothing is forgotten),
    encoded once: -> (the VAE posterior of each picture (n, C, h, w), prompt embeddings (n, L, D), mask)."""
    brown.write_data(folder)
    paths = sorted(folder.glob("*.png"))
    pixels = torch.cat([images.to_tensor(images.open_image(p)) for p in paths])  # (n, 3, H, W) in [-1, 1]
    embeds, mask = pipe.encode_prompt([p.with_suffix(".txt").read_text().strip() for p in paths])
    return pipe.vae.encode(pixels), embeds, mask


def train_lora(pipe, layers: dict, data, recipe, steps: int, log=print) -> None:
    """`steps` AdamW steps on the adapters' A and B with the package's flow-matching loss (train.py), the
    recipe's batch, learning rate and its schedule, timestep density and clipping."""
    posterior, embeds, mask = data
    schedule = scheduler.training_schedule(pipe.scheduler.config)  # (timesteps, sigmas), 1000 each
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    optimizer = train.make_optimizer(params, recipe, torch.device("cpu"))
    g = torch.Generator().manual_seed(recipe.seed)
    for step in range(steps):
        lr = recipe.learning_rate * train.lr_factor(recipe.lr_scheduler, step, recipe.lr_warmup_steps, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.randperm(len(embeds), generator=g)[: recipe.train_batch_size]
        z = posterior.mean[batch] + posterior.std[batch] * torch.randn(
            posterior.mean[batch].shape, generator=g
        )
        x0 = pipe.vae.normalize_latents(z)  # (B, C, h, w), as the MMDiT sees latents
        noise = torch.randn(x0.shape, generator=g)
        u = train.timestep_density(
            recipe.weighting_scheme, len(batch), recipe.logit_mean, recipe.logit_std, generator=g
        )
        loss = train.flow_matching_loss(
            pipe.transformer, x0, noise, u, embeds[batch], None if mask is None else mask[batch], schedule
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}: training diverged")
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.4f}, lr {lr:.2e}")


def measure(pipe, n: int, steps: int, pictures=None) -> dict:
    """As brown.measure_lora: brown objects in shapes or cells the LoRA never saw brown in, drawn brown in the
    right cell (the scorer's colour and position), and the base colours on held-out single objects."""
    unseen = [s.named() for s in brown.brown_scenes(n, seed=1, seen=False)]
    base = scenes.make_scenes(n, seed=2, split="held_out", two_object_fraction=0)
    drawn = []
    nano_measure.evaluate(pipe, unseen, steps=steps, pictures=drawn)
    verdicts = [scenes.score(p, s)[0] for p, s in zip(drawn, unseen)]
    if pictures is not None:
        pictures.append((drawn, unseen))
    return {
        "new_brown": sum(v["colour"] and v["position"] for v in verdicts) / len(verdicts),
        "base_colours": nano_measure.evaluate(pipe, base, steps=steps)["single_colour"],
    }


def report_lora(rows: dict, pictures: list, a) -> None:
    """The scores' table, and the first 8 unseen prompts drawn with your LoRA and the committed one."""
    print(
        f'\nmeasured on {a.n} prompts each ({a.steps} steps, CFG {nano.NanoConfig.eval_cfg:g} against ""), as brown.measure_lora:'
    )
    print(f"{'':<20} {'brown drawn brown, in the right cell':>38} {'base colours right':>20}")
    for label, row in rows.items():
        print(f"{label:<20} {row['new_brown']:>38.0%} {row['base_colours']:>20.0%}")
    (yours, shown), (committed, _) = pictures
    tiles = [p for pair in zip(yours[:8], committed[:8]) for p in pair]
    labels = [f"{who}: {scenes.caption(s)}" for s in shown[:8] for who in ("yours", "committed")]
    images.save_image(images.picture_grid(tiles, labels, columns=4, scale=2), a.out / "lora.png")
    print(f"your LoRA -> {a.out / 'lora.safetensors'}; yours | committed -> {a.out / 'lora.png'}")


def lora_main(a) -> int:
    try:
        lora_forward = load("lora_linear", a.assignments).lora_forward
        difference = check_forward(lora_forward)
    except (NotWritten, AttributeError) as e:
        print(f"FAIL: {e}")
        return 1
    except NotImplementedError as e:
        print(f"FAIL: your lora_forward is not written yet (NotImplementedError: {e})")
        return 1
    except Exception as e:  # a student's function may fail in any way: say how, without a traceback
        print(f"FAIL: your lora_forward raised {type(e).__name__}: {e}; see lesson 07, section 1")
        return 1
    if difference > 1e-5:
        print(
            f"FAIL: your lora_forward differs from the package's LoRALinear by {difference:.3g}: see lesson 07"
        )
        return 1
    # the committed LoRA's recipe, as `train` reads it (--data and --out are train's, not used here)
    recipe = parse_args(["--model", str(nano.COMMITTED), "--data", "-", "--out", "-", *brown.TRAIN_FLAGS])
    steps = recipe.max_train_steps if a.train_steps is None else a.train_steps
    print(
        f"capstone 2: a rank-{recipe.rank} LoRA (alpha {recipe.lora_alpha:g}, {recipe.lora_layers}) trained with "
        f"your lora_forward from {a.assignments}: {steps} steps of {recipe.train_batch_size}, lr "
        f"{recipe.learning_rate:g} ({recipe.lr_scheduler}), on brown.write_data's pictures "
        f"(matches the package's LoRALinear to {difference:.1g})"
    )
    start = time.perf_counter()
    pipe = nano_pipeline()
    pipe.transformer.requires_grad_(False)
    rows, pictures = {"without a LoRA": measure(pipe, a.n, a.steps)}, []
    g = torch.Generator().manual_seed(recipe.seed)
    layers = {}
    for name in lora.target_names(pipe.transformer, recipe.lora_layers):
        layers[name] = LoRALinear(
            pipe.transformer.get_submodule(name), lora_forward, recipe.rank, recipe.lora_alpha, g
        )
        put(pipe.transformer, name, layers[name])
    data = brown_data(pipe, a.out / "brown_data")
    started_training = time.perf_counter()
    train_lora(pipe, layers, data, recipe, steps)
    trained = time.perf_counter() - started_training
    rows["your LoRA"] = measure(pipe, a.n, a.steps, pictures)
    adapters = {name: (m.A.detach(), m.B.detach(), m.alpha) for name, m in layers.items()}
    lora.write_lora(a.out / "lora.safetensors", adapters)  # generate --lora reads it
    for name, layer in layers.items():
        put(pipe.transformer, name, layer.base)
    pipe.load_lora_weights(brown.COMMITTED_LORA, adapter_name="brown")
    rows["the committed LoRA"] = measure(pipe, a.n, a.steps, pictures)
    report_lora(rows, pictures, a)
    print(f"(training {trained:.0f} s, all {time.perf_counter() - start:.0f} s)")
    mine, theirs = rows["your LoRA"], rows["the committed LoRA"]
    if all(mine[k] >= theirs[k] - MARGIN for k in mine):
        print(f"PASS: your LoRA teaches brown as the committed one does (within {MARGIN:.0%})")
        return 0
    print(
        f"FAIL: your LoRA scores more than {MARGIN:.0%} below the committed one (fewer steps than its 1000?)"
    )
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python assignments/capstone.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("pieces", "lora"))
    p.add_argument(
        "--assignments",
        type=Path,
        default=Path(os.environ.get("ASSIGNMENTS", ROOT / "assignments")),
        help="the folder of your rope.py, guidance.py and lora_linear.py (default: $ASSIGNMENTS or assignments/)",
    )
    p.add_argument("--n", type=int, help="prompts to draw (default: pieces 8, the demo grid; lora 32)")
    p.add_argument("--steps", type=int, default=20, help="Euler steps per picture (default: 20, the model's)")
    p.add_argument("--train-steps", type=int, help="lora: training steps (default: the recipe's 1000)")
    p.add_argument("--out", type=Path, default=Path("out/capstone"), help="where the grids go")
    a = p.parse_args(argv)
    if a.n is None:
        a.n = len(nano.DEMO_PROMPTS) if a.command == "pieces" else brown.BROWN_PICTURES
    if a.n < 1 or a.steps < 1 or (a.train_steps is not None and a.train_steps < 1):
        p.error("--n, --steps and --train-steps must be at least 1")
    return pieces_main(a) if a.command == "pieces" else lora_main(a)


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints, all or nothing: save, resume bit for bit, keep the last N; and the training log.

    every --checkpointing_steps   checkpoint: full_states (every process takes part) -> save_checkpoint
                                  (checkpoint-<step>/, its files listed there); the oldest beyond the limit removed
    --resume_from_checkpoint      resume_target (before any work: which checkpoint, any steps left?), then
                                  resume_from_flag -> resume -> read_checkpoint (is it this run's? whole?)
    at the end                    finish: lora.safetensors or transformer/ beside the checkpoints
    every step                    a row of log.jsonl: step, loss, lr, grad_norm, seconds

A checkpoint is written in a hidden staging folder and renamed into place, so a crash leaves the earlier
checkpoints or the new one complete. No RNG state is saved: the data order and every draw are functions
of the seed and the step (train_data.micro_batch_seed).

Full fine-tuning on several processes (FSDP2) writes sharded checkpoints instead (sharded.py: every process
its own shards, through torch.distributed.checkpoint), which resume on any number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import ema as ema_file
from . import lora, mmdit, sharded, weights, writing
from .distributed import unwrap
from .train_config import TrainConfig

RUN_FIELDS = (
    "model",
    "finetune",
    "rank",
    "lora_alpha",
    "lora_layers",
    "resolution",
    "square",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "with_prior_preservation",
    "caption_dropout",
    "weighting_scheme",
    "mixed_precision",
)
FINAL_RESULTS = ("lora.safetensors", "transformer")  # what finish writes beside the checkpoints


def prepare_out(out: Path, resuming: bool, main_process: bool) -> None:
    """--out before a run: a folder that can be written, cleared of an interrupted save's staging folders, and
    refused when it holds an earlier run's checkpoints that this run would mix with its own, or the final
    result of a finished run that this one would overwrite."""
    writing.check_writable_folder(out, f"--out {out}")
    # Debris of an interrupted save (a staging folder), or of a process killed while it wrote a file (the
    # temporary files of writing.atomic_write and finish: .NAME.*.partial)
    for leftover in [*out.glob(".checkpoint-*"), *out.glob(".*.partial")]:
        if main_process and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif main_process:
            leftover.unlink(missing_ok=True)
    found = checkpoints_in(out)
    if found and not resuming:
        raise ValueError(
            f"--out {out} holds checkpoints of an earlier run: pass --resume_from_checkpoint latest "
            "to continue it, or choose another --out"
        )
    # A result with its checkpoints is continued by --resume_from_checkpoint (and written again at the end);
    # one without them (deleted to save space) is all that is left of that run.
    finished = [name for name in FINAL_RESULTS if (out / name).exists()]
    if finished and not found:
        raise ValueError(
            f"--out {out} holds a finished run's {' and '.join(finished)} (and no checkpoint to continue it "
            f"from), which this run would overwrite: choose another --out, or remove {out / finished[0]}"
        )


def run_identity(c: TrainConfig, world: int, cache: list[Path]) -> dict:
    """What a checkpoint must share with the run that resumes it: the settings that change what a step
    computes, the number of processes, and the examples by content, not by path (a digest of their cache
    keys: pictures, captions and sizes), so that a data folder moved or copied elsewhere still resumes."""
    identity = {k: getattr(c, k) for k in RUN_FIELDS}
    if c.use_ema:  # only then: checkpoints from before --use_ema existed stay this run's
        identity.update(use_ema=True, ema_decay=c.ema_decay)
    examples_digest = hashlib.sha256("".join(p.name for p in cache).encode()).hexdigest()[:16]
    identity.update(
        model=str(Path(c.model).resolve()),
        world_size=world,
        examples=examples_digest,
    )
    return identity


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def full_states(model, optimizer, c: TrainConfig, world: int) -> tuple[dict | None, dict]:
    """(full model state for saving, optimizer state keyed by parameter name), gathered to every process
    when sharded (torch.distributed.checkpoint's state-dict API: it also works in one process)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=world > 1)
    inner = unwrap(model)
    optim = get_optimizer_state_dict(inner, optimizer, options=options)
    model_state = None
    if c.finetune == "full":
        model_state = {k: v.detach().cpu() for k, v in get_model_state_dict(inner, options=options).items()}
    return model_state, optim


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    c: TrainConfig,
    identity: dict,
    trainable: dict,
    full_state: dict | None,
    optim_state: dict,
    ema: dict | None = None,
) -> Path:
    """out/checkpoint-<step>/, written in a hidden staging folder and renamed into place: a crash leaves
    either the previous checkpoints or the new one complete, never a half-written one.

    lora.safetensors          the adapter, diffusers format (loads in the pipelines, --lora, diffusers)
    transformer/              full fine-tuning: the transformer, official layout (fp32 master weights)
    training_state.safetensors  trainable weights as trained (LoRA; with --use_ema both kinds), AdamW
                              moments, the average (--use_ema); no RNG state: every draw is seeded by (seed,
                              micro-batch), see train_data.micro_batch_seed
    With --use_ema the adapter or transformer/ holds the average: what validation sampled, what a user loads.
    trainer_state.json        step, optimizer hyperparameters, the run's identity"""
    final = out / f"checkpoint-{step}"
    staging = out / f".checkpoint-{step}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tensors = {}
        if c.finetune == "lora" or ema:
            tensors.update({f"param.{n}": p.detach().float().cpu().clone() for n, p in trainable.items()})
        if ema:
            tensors.update({f"ema.{n}": t.cpu() for n, t in ema.items()})
        if c.finetune == "lora":
            with ema_file.swapped_in(trainable, ema):
                lora.write_lora(staging / "lora.safetensors", lora.adapter_state(unwrap(model), "default"))
        else:
            state = {k: ema[k] if ema and k in ema else v for k, v in full_state.items()}
            header = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
            writing.write_folder(
                staging / "transformer",
                mmdit.WEIGHTS_STEM,
                writing.plan_shards(header),
                state.values(),
                unwrap(model).config.to_json(),
            )
        for name, entry in optim_state["state"].items():
            for key, value in entry.items():
                tensors[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().cpu()
        names = sorted(tensors)
        writing.write_safetensors(
            staging / "training_state.safetensors",
            [(n, tuple(tensors[n].shape), tensors[n].dtype) for n in names],
            [tensors[n] for n in names],
        )
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
        writing.write_json(
            staging / "trainer_state.json", {"step": step, "param_groups": groups, "run": identity}
        )
        old = out / f".checkpoint-{step}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def save_sharded(out: Path, step: int, model, optimizer, identity: dict, main_process: bool) -> Path:
    """Every process: out/checkpoint-<step>/ with dcp/ (each process's shards, sharded.py) and
    trainer_state.json, staged and renamed into place as save_checkpoint does."""
    final, staging = out / f"checkpoint-{step}", out / f".checkpoint-{step}.partial-sharded"
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    sharded.save(staging / sharded.FOLDER, unwrap(model), optimizer)
    dist.barrier()  # every shard written
    if main_process:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        writing.write_json(
            staging / "trainer_state.json", {"step": step, "param_groups": groups, "run": identity}
        )
        old = out / f".checkpoint-{step}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint(out, step, model, optimizer, trainable, c, identity, main_process, world, ema=None) -> Path:
    """Gather the states (every process takes part), save on the main process; or, for full fine-tuning on
    several processes, every process saves its shards. -> the checkpoint's path."""
    if c.finetune == "full" and world > 1:
        save_sharded(out, step, model, optimizer, identity, main_process)
    else:
        model_state, optim = full_states(model, optimizer, c, world)
        if main_process:
            save_checkpoint(out, step, model, c, identity, trainable, model_state, optim, ema)
    if main_process:
        if c.checkpoints_total_limit:
            for old in checkpoints_in(out)[: -c.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return out / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int:
    """checkpoint-<step> -> step; -1 for any other name."""
    tail = path.name.split("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else -1


def checkpoints_in(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (staging folders are hidden: .checkpoint-*)."""
    return sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step
    )


def finish(out: Path, last: Path, c: TrainConfig, model=None, main_process: bool = True) -> None:
    """The final result beside the checkpoints, from the last one saved: lora.safetensors, or transformer/.
    Every process calls it: a sharded checkpoint's weights are gathered from the processes (sharded.py), once."""
    if (last / sharded.FOLDER).is_dir():
        whole = sharded.whole_weights(unwrap(model))  # on the main process only
        if main_process:
            staging = out / ".transformer.partial"
            shutil.rmtree(staging, ignore_errors=True)
            header = [(name, tuple(t.shape), t.dtype) for name, t in whole.items()]
            config = unwrap(model).config.to_json()
            writing.write_folder(
                staging, mmdit.WEIGHTS_STEM, writing.plan_shards(header), whole.values(), config
            )
            shutil.rmtree(out / "transformer", ignore_errors=True)
            os.replace(staging, out / "transformer")
        return
    if not main_process:
        return
    if c.finetune == "lora":
        shutil.copyfile(last / "lora.safetensors", out / ".lora.safetensors.partial")
        os.replace(out / ".lora.safetensors.partial", out / "lora.safetensors")
    else:
        staging = out / ".transformer.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(last / "transformer", staging)
        shutil.rmtree(out / "transformer", ignore_errors=True)
        os.replace(staging, out / "transformer")


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------


def resume_target(c: TrainConfig, out: Path, main_process: bool) -> Path | None:
    """--resume_from_checkpoint, before any work: the checkpoint folder to continue from ('latest': the last
    complete one in --out; None: a new run), refused when --out holds later checkpoints this run would mix
    with its own, or when it already reached --max_train_steps (nothing would train)."""
    if not c.resume_from_checkpoint:
        return None
    found = checkpoints_in(out)
    if c.resume_from_checkpoint == "latest":
        saved = found[-1] if found else None
    else:
        saved = Path(c.resume_from_checkpoint)
    later = [
        p.name
        for p in found
        if saved is not None
        and p.parent.resolve() == saved.parent.resolve()
        and checkpoint_step(p) > checkpoint_step(saved)
    ]
    if later:
        raise ValueError(
            f"--resume_from_checkpoint {saved}: {out} holds later checkpoints ({', '.join(later)}) "
            "that this run would mix with its own; move them away, or resume from 'latest'"
        )
    if saved is None:
        if main_process:
            print(f"--resume_from_checkpoint latest: no checkpoint in {out}; starting a new run")
        return None
    step = read_trainer_state(saved)["step"]
    if step >= c.max_train_steps:
        raise ValueError(
            f"--resume_from_checkpoint {c.resume_from_checkpoint}: {saved.name} is at step {step}, and "
            f"--max_train_steps is {c.max_train_steps}: nothing is left to train; pass --max_train_steps "
            f"above {step} to train further (its weights are in {saved})"
        )
    return saved


def resume_from_flag(
    saved: Path | None, identity: dict, model, optimizer, trainable: dict, c: TrainConfig, ema=None
) -> int:
    """The checkpoint resume_target chose (None: a new run) loaded into the model, optimizer and average;
    -> the step the run continues from."""
    return 0 if saved is None else resume(saved, identity, model, optimizer, trainable, c, ema)


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, its types checked: {"step": int, "run": {...}, ...}."""
    state_file = path / "trainer_state.json"
    tensors = (path / "training_state.safetensors").is_file() or (
        path / sharded.FOLDER / ".metadata"
    ).is_file()
    if not state_file.is_file() or not tensors:
        raise ValueError(
            f"--resume_from_checkpoint {path}: not a checkpoint of this trainer "
            "(trainer_state.json and training_state.safetensors, or dcp/, are missing)"
        )
    state = weights.parse_json(state_file.read_bytes(), state_file)
    ok = (
        isinstance(state, dict)
        and type(state.get("step")) is int
        and state["step"] >= 0
        and isinstance(state.get("run", {}), dict)
    )
    if not ok:
        raise weights.CheckpointError(
            f"--resume_from_checkpoint {path}: {state_file.name} is damaged (expected an object with an "
            f'integer "step" and a "run" object, got {json.dumps(state)[:120]}); resume from another '
            "checkpoint"
        )
    return state


def read_checkpoint(path: Path, identity: dict) -> tuple[int, dict, dict]:
    """-> (step, trainer_state, tensors), after checking the checkpoint belongs to this run and is whole.
    The number of processes may change if the micro-batches per step do not: 2 processes accumulating 3
    continue as 1 accumulating 6 or 3 accumulating 2 (the same micro-batches, train.optimizer_step)."""
    state = read_trainer_state(path)
    saved = state.get("run", {})
    differ = {
        k: (saved.get(k), identity.get(k)) for k in {*identity, *saved} if saved.get(k) != identity.get(k)
    }
    per_step = lambda run: run.get("world_size", 0) * run.get("gradient_accumulation_steps", 0)
    if per_step(saved) == per_step(identity):
        differ.pop("world_size", None), differ.pop("gradient_accumulation_steps", None)
    if differ:
        lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        hint = (
            f" (another number of processes resumes it when processes x --gradient_accumulation_steps stays "
            f"{per_step(saved)})"
            if "world_size" in differ
            else ""
        )
        raise ValueError(
            f"--resume_from_checkpoint {path}: the checkpoint is from another run ({lines}); "
            f"resume with the settings it was trained with{hint}, or start a new --out"
        )
    tensors_file = path / "training_state.safetensors"
    if not tensors_file.is_file():  # a sharded checkpoint: its tensors are read by sharded.load
        return state["step"], state, {}
    try:
        weights.SafetensorsFile(tensors_file)  # checks every offset against the file's size
        tensors = load_file(str(tensors_file))
    except (weights.CheckpointError, SafetensorError, OSError):
        raise weights.CheckpointError(
            f"--resume_from_checkpoint {path}: {tensors_file.name} is truncated or corrupt (a copy cut "
            "short, or a disk error); resume from an earlier checkpoint, or start a new --out"
        ) from None
    return state["step"], state, tensors


def resume(
    path: Path, identity: dict, model, optimizer, trainable: dict, c: TrainConfig, ema: dict | None = None
) -> int:
    """Load a checkpoint into the model, the optimizer and the average (--use_ema); -> its step."""
    step, state, tensors = read_checkpoint(path, identity)
    inner = unwrap(model)
    if (path / sharded.FOLDER).is_dir():  # written by several processes: resharded to this run's
        sharded.load(path / sharded.FOLDER, inner, optimizer)
        return step
    options = StateDictOptions(
        full_state_dict=True, strict=False
    )  # a weight that never had a gradient has no state
    if c.finetune == "lora" or ema is not None:  # the weights as trained (with --use_ema, not transformer/)
        missing = [f"{kind}.{n}" for n in trainable for kind in ("param", "ema")[: 1 + (ema is not None)]]
        missing = [n for n in missing if n not in tensors]
        if missing:
            raise weights.CheckpointError(
                f"--resume_from_checkpoint {path}: training_state.safetensors lacks {len(missing)} of the "
                f"trained weights (e.g. {missing[0]}); resume from another checkpoint"
            )
        with torch.no_grad():
            for n, average in (ema or {}).items():
                average.copy_(tensors[f"ema.{n}"])
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
            name, field_ = key[len("optim.") :].rsplit(".", 1)
            optim["state"].setdefault(name, {})[field_] = t
    # The optimizer's hyperparameters are this run's flags (identical, for an exact resume); the learning rate
    # is set from the step before every update.
    set_optimizer_state_dict(inner, optimizer, optim, options=options)
    for name, p in inner.named_parameters():  # it fills in zero state for weights that never had a gradient:
        if name not in optim["state"]:  # drop it, so the optimizer is exactly the saved one
            optimizer.state.pop(p, None)
    return step


# ---------------------------------------------------------------------------------------------
# The training log
# ---------------------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict]:
    """The rows of log.jsonl; a last line cut short by a killed process is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and "step" in r and "loss" in r]


def trim_log(path: Path, step: int) -> None:
    """Keep the rows of log.jsonl up to `step`: a resumed run continues the log of the steps it continues from."""
    if path.exists():
        kept = [row for row in read_log(path) if row["step"] <= step]
        with writing.atomic_write(path, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in kept))


def append_log(path: Path, row: dict) -> None:
    """One step's row at the end of log.jsonl (a plain append: a killed process leaves at most a cut last line)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")

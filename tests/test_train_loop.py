"""The training loop end to end on the tiny official-layout checkpoint (CPU, fp32): learning measured,
exact resume, torch.distributed (gloo), Edit and prior preservation, the cache, bad inputs, crashes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import COLOURS, checkpoint_state, squares
from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import (
    checkpoints,
    images,
    lora,
    mmdit,
    pipeline,
    sizes,
    train,
    train_config,
    train_data,
    writing,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("train") / "tiny", "tiny")


@pytest.fixture(scope="module")
def edit_model(tmp_path_factory):
    return sizes.write_checkpoint(
        tmp_path_factory.mktemp("train") / "edit", "tiny", "QwenImageEditPlusPipeline"
    )


def config(model, data, out, **overrides):
    settings = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        resolution=64,
        mixed_precision="no",
        train_batch_size=2,
        checkpointing_steps=1000,
        max_train_steps=4,
    )
    settings.update(overrides)
    return train_config.TrainConfig(**settings)


def sample_distance(pipe, data) -> float:
    """Mean over the four captions of ||sampled latents - that picture's latents||² / ||picture's latents||²
    (20 steps, seed 0): how far the samples are from the training data, in the MMDiT's own space."""
    out = []
    for name in COLOURS:
        x = pipe(
            prompt=f"a {name} square",
            true_cfg_scale=1.0,
            height=64,
            width=64,
            num_inference_steps=20,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            progress=False,
        ).images
        picture = images.to_tensor(Image.open(data / f"{name}.png").convert("RGB"))
        target = mmdit.pack_latents(pipe.vae.normalize_latents(pipe.vae.encode(picture).mean), 2)
        out.append(((x - target) ** 2).mean().item() / (target**2).mean().item())
    return sum(out) / len(out)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Learning, measured
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune, steps, lr", [("lora", 400, 3e-3), ("full", 300, 1e-3)])
def test_finetuning_drives_the_loss_down_and_the_samples_towards_the_data(
    model, tmp_path, finetune, steps, lr
):
    data = squares(tmp_path / "data")
    out = tmp_path / "out"
    train.train(
        config(
            model,
            data,
            out,
            finetune=finetune,
            max_train_steps=steps,
            learning_rate=lr,
            rank=8,
            lora_alpha=8,
            lora_layers="all-linear",
            train_batch_size=4,
            checkpointing_steps=steps,
        ),
        progress=False,
    )
    curve = losses(out)
    first, last = sum(curve[:20]) / 20, sum(curve[-20:]) / 20
    assert last < 0.85 * first, (first, last)

    pipe = pipeline.QwenImagePipeline.from_pretrained(model)
    before = sample_distance(pipe, data)
    if finetune == "lora":  # the trained file loads straight into the pipeline
        pipe.load_lora_weights(out / "lora.safetensors")
    else:  # the trained transformer/ is the official layout
        pipe.transformer = mmdit.load(out / "transformer")
    after = sample_distance(pipe, data)
    print(f"{finetune}: loss {first:.3f} -> {last:.3f}; sample distance {before:.2f} -> {after:.2f}")
    assert after < 0.7 * before, (before, after)
    assert (out / "loss.png").is_file()


def test_the_trained_lora_runs_in_the_command_line(model, tmp_path):
    data = squares(tmp_path / "data")
    out = tmp_path / "out"
    train.train(config(model, data, out, max_train_steps=2), progress=False)
    cli.main(
        [
            "generate",
            "--model",
            str(model),
            "--prompt",
            "a red square",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--lora",
            f"{out / 'lora.safetensors'}:0.8",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert Image.open(tmp_path / "x.png").size == (64, 64)
    adapters, layout = lora.read_lora(out / "lora.safetensors", mmdit.load(model / "transformer"))
    assert layout == "diffusers / PEFT" and len(adapters) == 4 * 2  # to_q/k/v/out.0 of 2 blocks


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_continues_exactly(model, tmp_path, finetune):
    """6 steps straight == 3 steps, stop, resume, 3 more: bit-identical weights and AdamW moments (with
    gradient accumulation, caption dropout, LoRA dropout, logit-normal timesteps and buckets)."""
    data = squares(tmp_path / "data", size=(80, 48))
    squares(tmp_path / "data2", size=(48, 64))
    for f in (tmp_path / "data2").iterdir():
        f.rename(tmp_path / "data" / f"tall_{f.name}")
    common = dict(
        finetune=finetune,
        gradient_accumulation_steps=2,
        caption_dropout=0.3,
        lora_dropout=0.1,
        weighting_scheme="logit_normal",
        checkpointing_steps=3,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
    )
    train.train(config(model, data, tmp_path / "a", max_train_steps=6, **common), progress=False)
    train.train(config(model, data, tmp_path / "b", max_train_steps=3, **common), progress=False)
    train.train(
        config(model, data, tmp_path / "b", max_train_steps=6, resume_from_checkpoint="latest", **common),
        progress=False,
    )
    a = load_file(tmp_path / "a" / "checkpoint-6" / "training_state.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-6" / "training_state.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    if finetune == "full":
        wa = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
        wb = load_file(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # and it did train: the weights moved from the start
    c = load_file(tmp_path / "b" / "checkpoint-3" / "training_state.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(("param.", "optim.")))


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on the CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"], ids=["ddp-lora", "fsdp2-full"])
def test_two_processes_reach_the_weights_of_one(model, tmp_path, finetune):
    """The same global batch: one process accumulating 2 micro-batches, or 2 processes with 1 each (DDP for
    LoRA, FSDP2 fully_shard per block for full fine-tuning) give the same weights within fp32 rounding."""
    data = squares(tmp_path / "data")
    flags = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--resolution",
        "64",
        "--mixed_precision",
        "no",
        "--train_batch_size",
        "1",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "4",
        "--finetune",
        finetune,
        "--caption_dropout",
        "0.3",
        "--lora_layers",
        "all-linear",
    ]  # the last block's text-side adapters
    # get no gradient: DDP must cope
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwenimage_minimal",
            "train",
            *flags,
            "--out",
            str(tmp_path / "one"),
            "--gradient_accumulation_steps",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "qwenimage_minimal",
            "train",
            *flags,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    if finetune == "lora":
        a = load_file(tmp_path / "one" / "checkpoint-4" / "training_state.safetensors")
        b = load_file(tmp_path / "two" / "checkpoint-4" / "training_state.safetensors")
    else:  # FSDP2 writes sharded checkpoints (sharded.py): compare the AdamW moments read whole
        a = checkpoint_state(tmp_path / "one" / "checkpoint-4", tmp_path)[1]
        b = checkpoint_state(tmp_path / "two" / "checkpoint-4", tmp_path)[1]
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert ((a[k] - b[k]).abs().max() / scale).item() <= 1e-5, k
    if finetune == "full":
        wa = load_file(tmp_path / "one" / "transformer" / "diffusion_pytorch_model.safetensors")
        wb = load_file(tmp_path / "two" / "transformer" / "diffusion_pytorch_model.safetensors")
        start = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
        assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-4  # and they moved
    assert (
        json.loads((tmp_path / "two" / "checkpoint-4" / "trainer_state.json").read_text())["run"][
            "world_size"
        ]
        == 2
    )


# ---------------------------------------------------------------------------------------------
# Edit, prior preservation, the cache
# ---------------------------------------------------------------------------------------------


def test_edit_training_with_condition_images_and_validation(edit_model, tmp_path):
    data = squares(tmp_path / "data")
    controls = tmp_path / "controls"
    controls.mkdir()
    for name in COLOURS:  # the "before" pictures: an empty background
        Image.new("RGB", (64, 64), (240, 240, 240)).save(controls / f"{name}.png")
    out = tmp_path / "out"
    train.train(
        config(
            edit_model,
            data,
            out,
            control_dirs=[str(controls)],
            max_train_steps=3,
            caption_dropout=0.5,
            validation_prompt=["add a red square"],
            validation_image=[str(controls / "red.png")],
            validation_inference_steps=2,
        ),
        progress=False,
    )
    assert Image.open(out / "samples" / "step-000003.png").size == (64, 64)
    entry = load_file(next((out / "cache").glob("*.safetensors")))
    assert entry["control_tokens"].shape == (16, 64) and entry["control_shapes"].tolist() == [[1, 4, 4]]
    # the caption is read with the condition image: the prompt is longer than the text alone
    assert entry["prompt_embeds"].shape[0] > 16 and entry["empty_embeds"].shape[0] > 16
    pipe = pipeline.QwenImageEditPipeline.from_pretrained(edit_model)
    pipe.load_lora_weights(out / "lora.safetensors")


def test_prior_preservation_and_jsonl_data(model, tmp_path):
    """Two instance pictures (.jsonl) against four class pictures: as in the reference, max(2, 4) = 4 pairs,
    instance i % 2 with class i % 4, so every class picture is used; the prior term is in the loss."""
    data = squares(tmp_path / "pictures", captions=False)
    rows = [{"image": f"pictures/{n}.png", "prompt": f"a {n} square"} for n in ("red", "blue")]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = config(
        model,
        tmp_path / "data.jsonl",
        tmp_path / "out",
        with_prior_preservation=True,
        class_data_dir=str(data),
        class_prompt="a square",
        max_train_steps=2,
    )
    examples, class_examples, _, _ = train_data.prepare_data(c, None, tmp_path / "out")
    assert [e.image.stem for e in examples] == ["red", "blue", "red", "blue"]
    assert [e.image.stem for e in class_examples] == ["blue", "green", "red", "yellow"]
    assert {e.prompt for e in class_examples} == {"a square"}
    train.train(c, progress=False)
    assert len(list((tmp_path / "out" / "cache").glob("*.safetensors"))) == 2 + 4
    with_prior = losses(tmp_path / "out")
    train.train(
        config(
            model,
            tmp_path / "data.jsonl",
            tmp_path / "out2",
            with_prior_preservation=True,
            class_data_dir=str(data),
            class_prompt="a square",
            max_train_steps=2,
            prior_loss_weight=0.0,
            embeddings_cache=str(tmp_path / "out" / "cache"),
        ),
        progress=False,
    )
    assert losses(tmp_path / "out2")[0] < with_prior[0]  # the same draws without the prior term


def test_caption_dropout_uses_the_empty_prompt_and_never_drops_class_prompts(model, tmp_path):
    data = squares(tmp_path / "data")
    c = config(
        model,
        data,
        tmp_path / "out",
        caption_dropout=0.5,
        with_prior_preservation=True,
        class_data_dir=str(data),
        class_prompt="a square",
        max_train_steps=1,
        train_batch_size=4,
    )
    train.train(c, progress=False)
    examples, class_examples, sizes, cache_dir = train_data.prepare_data(c, None, tmp_path / "out")
    model_id = f"{train_data.model_fingerprint(model)}:{torch.float32}"  # as train() keys the cache it filled
    cache = train_data.build_cache(None, examples, sizes, cache_dir, "instance", True, 512, 4, model_id)
    class_cache = train_data.build_cache(
        None, class_examples, sizes, cache_dir, "class", False, 512, 4, model_id
    )
    stats = torch.zeros(1, 16, 1, 1), torch.ones(1, 16, 1, 1)
    dropped = 0
    for seed in range(50):
        inputs = train.make_inputs(
            [0, 1, 2, 3],
            cache,
            class_cache,
            c,
            torch.Generator().manual_seed(seed),
            *stats,
            "cpu",
            torch.float32,
        )
        for i in range(4):
            own = train_data.read_cached(cache[i])
            length = (
                int(inputs["prompt_mask"][i].sum())
                if inputs["prompt_mask"] is not None
                else inputs["prompt_embeds"].shape[1]
            )
            row = inputs["prompt_embeds"][i, :length]
            is_empty = torch.equal(row, own["empty_embeds"])
            assert is_empty or torch.equal(row, own["prompt_embeds"])
            dropped += is_empty
        class_rows = inputs["prompt_embeds"][4:]
        class_embeds = train_data.read_cached(class_cache[0])["prompt_embeds"]
        assert all(torch.equal(r[: class_embeds.shape[0]], class_embeds) for r in class_rows)  # never dropped
    assert 0.4 < dropped / 200 < 0.6


def test_the_cache_is_reused_and_keyed_by_content(model, tmp_path):
    data = squares(tmp_path / "data")
    out = tmp_path / "out"
    train.train(config(model, data, out, max_train_steps=1), progress=False)
    files = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.safetensors")}
    assert len(files) == 4
    (data / "red.txt").write_text("a crimson square")  # one caption changes
    train.train(
        config(model, data, tmp_path / "out2", embeddings_cache=str(out / "cache"), max_train_steps=1),
        progress=False,
    )
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.safetensors")}
    assert len(after) == 5 and all(
        after[k] == v for k, v in files.items()
    )  # one new entry, the rest untouched


def test_buckets_come_from_a_ladder_are_multiples_of_16_and_never_upscale():
    assert train_data.bucket_size(1920, 1080, 1024) == (768, 1360)  # 16:9 at ~1024² pixels
    assert train_data.bucket_size(1080, 1920, 1024) == (1360, 768)
    assert train_data.bucket_size(100, 60, 1024) == (48, 80)  # small: 64² pixels, 16:9 (5:3 nearest)
    g = torch.Generator().manual_seed(0)
    sides = torch.randint(1100, 3000, (100, 2), generator=g).tolist()  # all at least 1024² pixels
    assert len({train_data.bucket_size(w, h, 1024) for w, h in sides}) <= len(
        train_data.ASPECT_RATIOS
    )  # batches stay full
    assert train_data.bucket_size(500, 300, 256, square=True) == (256, 256)
    for w, h in [(1000, 1000), (333, 777), (4000, 100)]:
        bh, bw = train_data.bucket_size(w, h, 512)
        assert bh % 16 == 0 and bw % 16 == 0 and bh * bw <= 1.1 * 512 * 512
    batches = train_data.epoch_batches(((64, 64),) * 5 + ((32, 96),) * 3, 2, epoch=0, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len({i < 5 for i in b}) == 1 for b in batches)  # one bucket per batch
    assert train_data.epoch_batches(((64, 64),) * 8, 2, 1, 0) != train_data.epoch_batches(
        ((64, 64),) * 8, 2, 0, 0
    )
    # the long names of diffusers' script are accepted
    c = train_config.parse_args(
        ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--output_dir", "o"]
    )
    assert (c.model, c.data, c.out) == ("m", "d", "o")


# ---------------------------------------------------------------------------------------------
# Bad inputs and crashes
# ---------------------------------------------------------------------------------------------


def test_bad_data_and_settings_are_refused_with_the_flag_named(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(data=empty), "no images"),
        (dict(data=tmp_path / "missing"), "no such folder"),
        (dict(resolution=100), "--resolution 100: must be a multiple of 16"),
        (dict(learning_rate=0.0), "--learning_rate"),
        (dict(caption_dropout=1.0), "--caption_dropout"),
        (dict(with_prior_preservation=True), "--class_data_dir"),
    ]
    data = squares(tmp_path / "data")
    for overrides, message in cases:
        settings = {"data": data, **overrides}
        with pytest.raises(ValueError, match=message):
            train.train(config(model, settings.pop("data"), tmp_path / "out", **settings), progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="expected a folder of images and captions, or a .jsonl"):
        train.train(config(model, tmp_path / "notes.txt", tmp_path / "out"), progress=False)

    uncaptioned = squares(tmp_path / "uncaptioned", captions=False)
    with pytest.raises(ValueError, match="blue.png has no caption file blue.txt; .* --instance_prompt"):
        train.train(config(model, uncaptioned, tmp_path / "out"), progress=False)
    train.train(
        config(model, uncaptioned, tmp_path / "out_ip", instance_prompt="a square", max_train_steps=1),
        progress=False,
    )  # the documented rule

    corrupt = squares(tmp_path / "corrupt")
    (corrupt / "blue.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="blue.png"):
        train.train(config(model, corrupt, tmp_path / "out"), progress=False)


def test_learning_rate_schedules_equal_diffusers():
    from diffusers.optimization import get_scheduler

    for kind in train_config.LR_SCHEDULERS:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = get_scheduler(kind, optimizer=opt, num_warmup_steps=3, num_training_steps=10)
        for step in range(12):
            expected = opt.param_groups[0]["lr"]
            assert train.lr_factor(kind, step, 3, 10) == pytest.approx(expected, abs=1e-12), (kind, step)
            opt.step()
            ref.step()


def test_settings_file_types_are_checked(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"validation_prompt": "a photo of a dog", "rank": 8}))
    c = train_config.parse_args(
        ["--config", str(settings), "--model", "m", "--data", "d", "--out", "o", "--rank", "16"]
    )
    assert (
        c.validation_prompt == ("a photo of a dog",) and c.rank == 16
    )  # one string is one prompt; flags win
    settings.write_text(json.dumps({"learning_rate": "1e-4"}))
    with pytest.raises(ValueError, match="'learning_rate' must be float"):
        train_config.parse_args(["--config", str(settings), "--model", "m", "--data", "d", "--out", "o"])


def test_resuming_another_runs_checkpoint_is_refused(model, tmp_path):
    data = squares(tmp_path / "data")
    train.train(config(model, data, tmp_path / "a", max_train_steps=2, checkpointing_steps=2), progress=False)
    with pytest.raises(ValueError, match=r"from another run \(rank: checkpoint 4, now 8\)"):
        train.train(
            config(
                model,
                data,
                tmp_path / "b",
                rank=8,
                resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"),
            ),
            progress=False,
        )
    with pytest.raises(
        ValueError, match="holds checkpoints of an earlier run: pass --resume_from_checkpoint latest"
    ):
        train.train(config(model, data, tmp_path / "a", max_train_steps=2), progress=False)
    with pytest.raises(ValueError, match="not a checkpoint of this trainer"):
        train.train(
            config(model, data, tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a")), progress=False
        )
    train.train(
        config(
            model,
            data,
            tmp_path / "a",
            max_train_steps=4,
            checkpointing_steps=2,
            resume_from_checkpoint="latest",
        ),
        progress=False,
    )
    with pytest.raises(ValueError, match=r"holds later checkpoints \(checkpoint-4\)"):
        train.train(
            config(
                model,
                data,
                tmp_path / "a",
                max_train_steps=3,
                resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"),
            ),
            progress=False,
        )
    bad_config = tmp_path / "settings.json"
    bad_config.write_text(json.dumps({"rnak": 4}))
    with pytest.raises(ValueError, match="unknown keys: \\['rnak'\\]"):
        train_config.parse_args(["--config", str(bad_config), "--model", "m", "--data", "d", "--out", "o"])


def test_a_crash_mid_save_leaves_the_previous_checkpoints_whole(model, tmp_path, monkeypatch):
    data = squares(tmp_path / "data")
    out = tmp_path / "out"
    train.train(config(model, data, out, max_train_steps=2, checkpointing_steps=2), progress=False)
    real = writing.write_safetensors

    def full_disk(path, *args, **kwargs):
        if Path(path).name == "training_state.safetensors":
            raise writing.OutputError(28, f"cannot write {path}: the disk is full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writing, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="the disk is full"):
        train.train(
            config(
                model, data, out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"
            ),
            progress=False,
        )
    monkeypatch.undo()
    assert [p.name for p in checkpoints.checkpoints_in(out)] == [
        "checkpoint-2"
    ]  # no half-written checkpoint-4
    assert not list(out.glob(".checkpoint-*"))
    # A process killed mid-save (SIGKILL: no clean-up) leaves a hidden staging folder: 'latest' ignores it,
    # and the next run removes it.
    shutil.copytree(out / "checkpoint-2", out / ".checkpoint-4.partial-12345")
    (out / ".checkpoint-4.partial-12345" / "training_state.safetensors").write_bytes(b"\0" * 10)
    train.train(
        config(model, data, out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"),
        progress=False,
    )
    assert [p.name for p in checkpoints.checkpoints_in(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".checkpoint-*"))

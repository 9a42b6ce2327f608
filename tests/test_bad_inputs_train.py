"""Issue 30, the training side: nothing lost, nothing silently wrong. Each test is a case that went wrong
before: a folder deleted or overwritten without a word, a setting that trained something else than asked, a
traceback where one sentence says what to do. The tiny official-layout checkpoint, on the CPU, in fp32."""

import json
import math
import os
import shutil
import time

import pytest
import torch
from PIL import Image

import weights_convert
from conftest import squares
from qwenimage_minimal import checkpoints, sizes, train, train_config, train_data, weights
from qwenimage_minimal.nano import NanoConfig, recipe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("train") / "tiny", "tiny")


def config(model, data, out, **overrides):
    settings = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        resolution=64,
        mixed_precision="no",
        train_batch_size=2,
        checkpointing_steps=1000,
        max_train_steps=2,
        device="cpu",
    )
    settings.update(overrides)
    return train_config.TrainConfig(**settings)


# ---------------------------------------------------------------------------------------------
# 1. train-nano's work folder
# ---------------------------------------------------------------------------------------------


def test_train_nano_refuses_a_folder_it_did_not_make_and_keeps_a_finished_model(tmp_path, capsys):
    """Before: build removed <out>/data, model and run without asking, whoever had written them."""
    quick = lambda out: NanoConfig(out=str(out), **{**recipe.QUICK, "dit_steps": 1, "vae_steps": 1})
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "holiday.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"mine is not empty \(data\) and was not made by train-nano"):
        recipe.build(quick(mine))
    assert (mine / "data" / "holiday.txt").read_text() == "precious"

    earlier = tmp_path / "nano"  # an earlier build's folder, finished: model/report.json is written last
    for sub in ("data", "run", "model"):
        (earlier / sub).mkdir(parents=True)
    (earlier / recipe.MARKER).write_text("")
    (earlier / "model" / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished nano model .* pass --overwrite"):
        recipe.build(quick(earlier))
    assert (earlier / "model" / "report.json").is_file()
    (earlier / "notes.md").write_text("mine")  # a file the recipe never writes: refused even with --overwrite
    with pytest.raises(ValueError, match="holds notes.md, which train-nano did not write"):
        recipe.prepare_out(earlier, overwrite=True)
    (earlier / "notes.md").unlink()
    recipe.prepare_out(earlier, overwrite=True)  # what --overwrite does: the earlier build's folders go
    assert sorted(p.name for p in earlier.iterdir()) == [recipe.MARKER]
    recipe.prepare_out(tmp_path / "new")  # a new folder is marked first
    assert (tmp_path / "new" / recipe.MARKER).is_file()

    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match=r"^error: --out .*afile is a file: give a folder") as e:
        recipe.main(["--out", str(tmp_path / "afile"), "--quick"])
    assert "\n" not in str(e.value)
    assert (tmp_path / "afile").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# 2. train --out
# ---------------------------------------------------------------------------------------------


def test_train_refuses_an_out_holding_a_finished_run_or_inside_the_data(model, tmp_path):
    data = squares(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"an earlier run's LoRA")  # its checkpoints deleted
    with pytest.raises(
        ValueError, match="holds a finished run's lora.safetensors .* choose another --out, or"
    ):
        train.train(config(model, data, out), progress=False)
    with pytest.raises(ValueError, match="holds a finished run's lora.safetensors"):
        train.train(config(model, data, out, resume_from_checkpoint="latest"), progress=False)
    assert (out / "lora.safetensors").read_bytes() == b"an earlier run's LoRA"
    assert not (out / "cache").exists()  # refused before any work

    for inside in (data, data / "runs" / "a"):
        with pytest.raises(ValueError, match="is inside --data .* choose an --out outside it"):
            train_config.check_config(config(model, data, inside))
    c = config(
        model,
        data,
        tmp_path / "classes" / "out",
        with_prior_preservation=True,
        class_data_dir=str(tmp_path / "classes"),
        class_prompt="a square",
    )
    squares(tmp_path / "classes")
    with pytest.raises(ValueError, match="is inside --class_data_dir"):
        train_config.check_config(c)


# ---------------------------------------------------------------------------------------------
# 3. the debris of a killed cache write; 10. a damaged cache file
# ---------------------------------------------------------------------------------------------


def test_the_cache_removes_stale_temporary_files_and_recomputes_damaged_entries(model, tmp_path):
    data = squares(tmp_path / "data")
    cache = tmp_path / "out" / "cache"
    cache.mkdir(parents=True)
    # what writing.atomic_write leaves when SIGKILL stops it: .<name>.<random>.partial
    stale, fresh = cache / ".0123abcd.safetensors.k1ll3d.partial", cache / ".4567.safetensors.wr1t1ng.partial"
    stale.write_bytes(b"\0" * 100)
    fresh.write_bytes(b"\0" * 100)  # another run sharing the cache may be writing it now: kept
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    train.train(config(model, data, tmp_path / "out", max_train_steps=1), progress=False)
    assert not stale.exists() and fresh.exists()

    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 4
    with open(entries[0], "r+b") as f:  # a copy cut short
        f.truncate(300)
    with pytest.raises(ValueError, match=r"the cache file .* is truncated or corrupt; delete it"):
        train_data.read_cached(entries[0])
    train.train(
        config(model, data, tmp_path / "out2", max_train_steps=1, embeddings_cache=str(cache)), progress=False
    )
    assert set(train_data.read_cached(entries[0])) >= {"latent_mean", "prompt_embeds"}  # computed again


# ---------------------------------------------------------------------------------------------
# 4. every number checked before any work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prior_loss_weight=-1.0), r"--prior_loss_weight must be a finite number >= 0 .*, got -1.0"),
        (dict(logit_mean=math.nan), "--logit_mean must be a finite number, got nan"),
        (dict(logit_std=math.inf), "--logit_std must be a finite number > 0, got inf"),
        (dict(mode_scale=math.nan), r"--mode_scale must be a finite number in \[-1, 1.75\]"),
        (dict(mode_scale=3.0), r"--mode_scale .* the 'mode' density leaves \[0, 1\]"),
        (dict(lora_alpha=math.inf), "--lora_alpha must be a finite number > 0"),
        (dict(learning_rate=math.nan), "--learning_rate must be a finite number > 0"),
        (dict(adam_beta1=math.nan), r"--adam_beta1 must be a finite number in \[0, 1\)"),
        (dict(adam_beta2=math.inf), r"--adam_beta2 must be a finite number in \[0, 1\)"),
        (dict(adam_epsilon=math.inf), "--adam_epsilon must be a finite number > 0"),
        (dict(adam_weight_decay=math.inf), "--adam_weight_decay must be a finite number >= 0"),
        (dict(max_grad_norm=math.inf), r"--max_grad_norm must be a finite number >= 0 \(0: no clipping\)"),
        (dict(caption_dropout=math.nan), r"--caption_dropout must be a finite number in \[0, 1\)"),
        (dict(validation_cfg=math.inf), "--validation_cfg must be a finite number >= 1"),
        (dict(seed=2**64), r"--seed must be an integer in \[0, 2\*\*63\), got 18446744073709551616"),
        (dict(seed=-1), r"--seed must be an integer in \[0, 2\*\*63\)"),
        (dict(resolution=65536, square=True), "--resolution 65536: must be a multiple of 16 .* to 8192"),
        (dict(max_sequence_length=5000), r"--max_sequence_length must be in 1\.\.1024"),
    ],
)
def test_every_training_number_is_checked_before_any_work(model, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train(config(model, squares(tmp_path / "data"), tmp_path / "out", **overrides), progress=False)
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_trains(model, tmp_path):
    """Before: a seed the check let through could overflow torch's seed once multiplied (the data order)."""
    train.train(config(model, squares(tmp_path / "data"), tmp_path / "out", seed=2**63 - 1), progress=False)
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_a_diverged_run_names_a_checkpoint_only_if_there_is_one(model, tmp_path, monkeypatch):
    """Before: "the last good checkpoint is in <out>", with no checkpoint there."""
    data = squares(tmp_path / "data")
    nan = lambda *args, **kwargs: torch.tensor(math.nan, requires_grad=True)
    monkeypatch.setattr(train, "flow_matching_loss", nan)
    with pytest.raises(FloatingPointError, match=r"at step 1: .* no checkpoint was saved before it") as e:
        train.train(config(model, data, tmp_path / "out"), progress=False)
    assert "last good checkpoint" not in str(e.value)


def test_resuming_a_run_that_reached_max_train_steps_says_what_to_pass(model, tmp_path):
    """Before: it printed "done" and trained nothing."""
    data = squares(tmp_path / "data")
    train.train(config(model, data, tmp_path / "out", checkpointing_steps=2), progress=False)
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2 is at step 2, and --max_train_steps is 2: nothing is left to train; "
        r"pass --max_train_steps above 2",
    ):
        train.train(config(model, data, tmp_path / "out", resume_from_checkpoint="latest"), progress=False)


# ---------------------------------------------------------------------------------------------
# 5. the data
# ---------------------------------------------------------------------------------------------


def test_an_empty_caption_and_a_picture_smaller_than_its_bucket_are_errors_naming_the_file(model, tmp_path):
    data = squares(tmp_path / "data")
    (data / "red.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"the caption .*red.txt is empty"):
        train_data.read_examples(data)
    (data / "red.txt").write_text("a red square")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "data/red.png", "prompt": ""}))
    with pytest.raises(ValueError, match=r'line 1: the "prompt" of data/red.png is empty'):
        train_data.read_examples(tmp_path / "data.jsonl")

    Image.new("RGB", (1, 1), (255, 0, 0)).save(data / "dot.png")
    (data / "dot.txt").write_text("a red dot")
    for square in (False, True):
        with pytest.raises(
            ValueError, match=r"dot.png is 1x1 pixels, smaller than the smallest training size"
        ):
            train_data.prepare_data(
                config(model, data, tmp_path / "out", square=square), None, tmp_path / "out"
            )
    # a picture at least its bucket in one side is used (cropped, or rounded up to a multiple of 16)
    Image.new("RGB", (48, 64)).save(data / "dot.png")
    train_data.prepare_data(config(model, data, tmp_path / "out"), None, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# 6. validation's negative prompt, CFG and steps: the model folder's own
# ---------------------------------------------------------------------------------------------


class PromptRecorder:
    """A text-to-image pipeline that records the prompts it encodes."""

    def __init__(self):
        self.prompts = []

    def encode_prompt(self, prompt, max_sequence_length=None):
        self.prompts.append(prompt)
        return torch.zeros(1, 3, 8), None


def test_validation_uses_the_model_folders_negative_prompt_cfg_and_steps(model, tmp_path):
    data = squares(tmp_path / "data")
    c = config(model, data, tmp_path / "out", validation_prompt=("a red square",))
    assert train_config.with_model_defaults(c).validation_cfg == 4.0  # no pipeline_defaults.json: official
    own = tmp_path / "own"
    shutil.copytree(model, own)
    (own / "pipeline_defaults.json").write_text(
        json.dumps({"true_cfg_scale": 2.0, "negative_prompt": "", "num_inference_steps": 7})
    )
    c = train_config.with_model_defaults(
        config(own, data, tmp_path / "out", validation_prompt=("a red square",))
    )
    assert (c.validation_cfg, c.validation_inference_steps, c.validation_negative_prompt) == (2.0, 7, "")
    pipe = PromptRecorder()
    train_data.validation_entries(c, pipe, edit=False)
    assert pipe.prompts == ["a red square", ""]  # before: " ", hard-coded
    flags = train_config.parse_args(
        ["--model", str(own), "--data", "d", "--out", "o", "--validation_negative_prompt", "blurry"]
        + ["--validation_cfg", "3", "--validation_inference_steps", "5"]
    )
    c = train_config.with_model_defaults(flags)
    assert (c.validation_cfg, c.validation_inference_steps, c.validation_negative_prompt) == (
        3.0,
        5,
        "blurry",
    )


# ---------------------------------------------------------------------------------------------
# 7. --help; 8. what a run says
# ---------------------------------------------------------------------------------------------


def test_train_help_prints_no_argparse_internals_and_no_default_none(capsys):
    with pytest.raises(SystemExit):
        train_config.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "option_strings" not in text and "~30% slower" in text
    assert "(default: None)" not in text and text.count("(default: <out>/cache") == 1
    assert "--validation_negative_prompt" in text


def test_a_run_says_what_it_trains_counts_images_announces_the_final_validation_and_the_result(
    model, tmp_path, capsys
):
    data = squares(tmp_path / "data")
    c = config(
        model, data, tmp_path / "out", validation_prompt=("a red square",), validation_inference_steps=2
    )
    train.train(c, progress=True)
    said = capsys.readouterr()
    assert "training a LoRA (rank 4" in said.out and "trainable parameters" in said.out
    assert "4 pictures in 1 bucket (width x height): 64x64 (4)" in said.out
    assert "cpu, fp32 (--mixed_precision no)" in said.out and "2 steps of 2 pictures" in said.out
    assert "4/4" in said.err.replace("\r", "\n")  # the cache bar counts images (before: chunks of 16, 1/1)
    assert "sampling the validation prompt with the final weights" in said.out
    last = said.out.strip().splitlines()[-1]
    assert last.startswith(f"done: {tmp_path / 'out' / 'lora.safetensors'}")


# ---------------------------------------------------------------------------------------------
# 9. the data identified by content
# ---------------------------------------------------------------------------------------------


def test_a_moved_data_folder_still_resumes(model, tmp_path):
    """Before: the checkpoint held the data folder's absolute path, and a moved copy was "another run"."""
    data = squares(tmp_path / "data")
    train.train(config(model, data, tmp_path / "out", checkpointing_steps=2), progress=False)
    moved = tmp_path / "elsewhere" / "pictures"
    moved.parent.mkdir()
    data.rename(moved)
    train.train(
        config(model, moved, tmp_path / "out", max_train_steps=3, resume_from_checkpoint="latest"),
        progress=False,
    )
    assert [p.name for p in checkpoints.checkpoints_in(tmp_path / "out")] == ["checkpoint-2", "checkpoint-3"]
    (moved / "red.txt").write_text("a crimson square")  # other content is another run
    with pytest.raises(ValueError, match="from another run .*examples"):
        train.train(
            config(model, moved, tmp_path / "out", max_train_steps=4, resume_from_checkpoint="latest"),
            progress=False,
        )


# ---------------------------------------------------------------------------------------------
# 10. one sentence, no traceback
# ---------------------------------------------------------------------------------------------


def test_damaged_checkpoints_are_one_sentence(model, tmp_path):
    data = squares(tmp_path / "data")
    out = tmp_path / "out"
    train.train(config(model, data, out, checkpointing_steps=2), progress=False)
    state = out / "checkpoint-2" / "trainer_state.json"
    good = state.read_text()
    resume = config(model, data, out, max_train_steps=3, resume_from_checkpoint="latest")
    for bad in ('{"step": "x"}', "[1, 2]", '{"step": 1, "run": 5}'):
        state.write_text(bad)
        with pytest.raises(weights.CheckpointError, match='trainer_state.json is damaged .* integer "step"'):
            train.train(resume, progress=False)
    state.write_text(good)
    tensors = out / "checkpoint-2" / "training_state.safetensors"
    with open(tensors, "r+b") as f:
        f.truncate(tensors.stat().st_size - 100)
    with pytest.raises(weights.CheckpointError, match="training_state.safetensors is truncated or corrupt"):
        train.train(resume, progress=False)


def test_settings_that_failed_late_or_with_a_traceback_are_refused_first(
    model, tmp_path, monkeypatch, capsys
):
    data = squares(tmp_path / "data")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"learning_rate": None}))
    with pytest.raises(ValueError, match=r"'learning_rate' must be float, got null"):
        train_config.read_config_file(settings)
    settings.write_text(json.dumps({"checkpoints_total_limit": None, "instance_prompt": None}))
    assert train_config.read_config_file(settings)["checkpoints_total_limit"] is None  # None is its default

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here .* use --device cpu"):
        train.train(config(model, data, tmp_path / "out", device="cuda"), progress=False)
    with pytest.raises(ValueError, match="--device 'gpu': not a device name"):
        train.train(config(model, data, tmp_path / "out", device="gpu"), progress=False)
    assert not (tmp_path / "out").exists()

    fp8_model = tmp_path / "fp8"
    shutil.copytree(model, fp8_model, ignore=shutil.ignore_patterns("transformer"))
    assert (
        weights_convert.main([str(model / "transformer"), str(fp8_model / "transformer"), "--dtype", "fp8"])
        == 0
    )
    for finetune in ("full", "lora"):
        with pytest.raises(SystemExit, match=r"^error: --model .*fp8: its transformer is stored in fp8") as e:
            train.main(
                ["--model", str(fp8_model), "--data", str(data), "--out", str(tmp_path / "out")]
                + ["--finetune", finetune, "--resolution", "64", "--device", "cpu"]
            )
        assert "--dtype bf16" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()

"""Full fine-tuning at scale on the CPU with gloo: FSDP2 built on the meta device, and sharded checkpoints
(torch.distributed.checkpoint) saved on 2 processes that resume on 1 and on 3 as if never interrupted."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import checkpoint_state, squares
from qwenimage_minimal import sizes

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("sharded") / "tiny", "tiny")


def train(processes: int, model, data, out, accumulation: int, *flags) -> None:
    runner = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    command = [sys.executable, *runner, "-m", "qwenimage_minimal", "train", "--model", str(model)]
    command += ["--data", str(data), "--out", str(out), "--finetune", "full", "--resolution", "64"]
    command += ["--mixed_precision", "no", "--train_batch_size", "1", "--caption_dropout", "0.3"]
    command += ["--gradient_accumulation_steps", str(accumulation), "--max_train_steps", "4", *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_a_sharded_checkpoint_of_2_processes_resumes_on_1_and_on_3_as_if_uninterrupted(model, tmp_path):
    """6 micro-batches per step throughout: 2 processes x 3 accumulated, then 1 x 6 or 3 x 2 after the resume;
    the weights and AdamW moments at step 4 equal the uninterrupted 2-process run's within fp32 rounding."""
    data = squares(tmp_path / "data")
    train(2, model, data, tmp_path / "two", 3, "--checkpointing_steps", "2")
    straight = tmp_path / "two" / "checkpoint-4"
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").iterdir()) == [
        "dcp",
        "trainer_state.json",
    ]
    assert (
        len(list((tmp_path / "two" / "checkpoint-2" / "dcp").glob("*.distcp"))) == 2
    )  # one file per process
    for processes, accumulation in ((1, 6), (3, 2)):
        out = tmp_path / f"resumed-on-{processes}"
        out.mkdir()
        shutil.copytree(tmp_path / "two" / "checkpoint-2", out / "checkpoint-2")
        shutil.copytree(tmp_path / "two" / "cache", out / "cache")  # the same cache, not computed again
        train(processes, model, data, out, accumulation, "--resume_from_checkpoint", "latest")
        weights, moments = checkpoint_state(out / "checkpoint-4", tmp_path)
        want_weights, want_moments = checkpoint_state(straight, tmp_path)
        assert weights.keys() == want_weights.keys() and moments.keys() == want_moments.keys()
        weight_error = max((weights[k] - want_weights[k]).abs().max().item() for k in weights)
        moment_error = max(
            ((moments[k] - want_moments[k]).abs().max() / want_moments[k].abs().max().clamp_min(1e-12)).item()
            for k in moments
        )
        print(
            f"resumed on {processes}: max |weights - straight| {weight_error:.2e}, moments {moment_error:.2e}"
        )
        assert weight_error <= 1e-6 and moment_error <= 1e-6, (processes, weight_error, moment_error)
        final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")  # gathered at the end
        assert max((final[k] - want_weights[k]).abs().max().item() for k in final) <= 1e-6
    start = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert max((want_weights[k] - start[k]).abs().max().item() for k in start) > 1e-4  # and it trained


def test_meta_initialisation_halves_the_start_up_memory_of_each_of_2_processes(tmp_path):
    """Peak RSS of loading a 42 M-parameter (170 MB) transformer on 2 processes (benchmarks/bench_fsdp_memory.py):
    loaded whole then sharded, each process pays the whole model; built on meta, about half."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_fsdp_memory.py"
    folder = tmp_path / "transformer"
    subprocess.run([sys.executable, script, folder, "--write", "--layers", "1"], check=True, env=ENV)
    load_mb = {}
    for mode in ("whole", "meta"):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, folder, mode],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(row) for row in re.findall(r"\{[^{}]*\}", done.stdout)]  # one per process
        assert len(rows) == 2, done.stdout
        load_mb[mode] = max(row["load_mb"] for row in rows)
    print("peak RSS of loading, per process (MB):", load_mb)
    assert load_mb["meta"] < 0.7 * load_mb["whole"], load_mb

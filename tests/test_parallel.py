"""Sampling on several processes (parallel.py) against one process, on the CPU with gloo: tensor parallel on 2,
CFG parallel on 2, both on 4 (2 x 2), for text-to-image and Edit-2509 on tiny random official-layout
checkpoints; the final latents agree within 1e-5 (fp32), and each process holds 1/n of the blocks' weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import pipeline, sizes

WORKER = Path(__file__).with_name("parallel_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return (
        sizes.write_checkpoint(root / "t2i", "tiny"),
        sizes.write_checkpoint(root / "edit", "tiny", "QwenImageEditPlusPipeline"),
    )


def launch(processes: int, *args) -> None:
    """The worker in one process (python) or several (torchrun, gloo), its failure shown."""
    runner = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    done = subprocess.run(
        [sys.executable, *runner, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_tensor_and_cfg_parallel_give_the_latents_of_one_process(folders, tmp_path):
    t2i, edit = folders
    launch(1, WORKER, t2i, edit, tmp_path, "1x1")
    launch(2, WORKER, t2i, edit, tmp_path, "2x1", "1x2")  # tensor parallel on 2; CFG parallel on 2
    launch(4, WORKER, t2i, edit, tmp_path, "2x2")  # both: 2 CFG rows of 2 tensor-parallel processes
    report = {}
    for name in ("t2i", "edit"):
        reference = torch.load(tmp_path / f"{name}-tp1-cfg1-rank0.pt")
        for tp, cfg in ((2, 1), (1, 2), (2, 2)):
            for rank in range(tp * cfg):  # every process ends with the same latents
                tag = f"{name}-tp{tp}-cfg{cfg}"
                latents = torch.load(tmp_path / f"{tag}-rank{rank}.pt")
                difference = (latents - reference).abs().max().item()
                report[f"{tag}-rank{rank}"] = difference
                assert difference <= 1e-5, (tag, rank, difference)
                held = json.loads((tmp_path / f"{tag}-rank{rank}.json").read_text())
                # 1/tp of the blocks' weights; what stays whole (row-wise biases, q/k norms) is < 0.5 % here
                assert abs(held["local"] - held["whole"] / tp) <= 0.005 * held["whole"], (tag, held)
        assert reference.abs().max() > 1  # latents, not zeros
    print("max |latents - one process|:", report)


def test_torchrun_generate_with_tensor_parallel_writes_the_picture_of_one_process(folders, tmp_path):
    t2i, _ = folders
    flags = ["--model", t2i, "--prompt", "a red square", "--steps", "2", "--cfg", "4"]
    flags += ["--width", "64", "--height", "48", "--device", "cpu"]
    cli.main(["generate", *map(str, flags), "--out", str(tmp_path / "one.png")])
    launch(
        2,
        "-m",
        "qwenimage_minimal",
        "generate",
        *flags,
        "--out",
        tmp_path / "two.png",
        "--tensor-parallel",
        "2",
    )
    one, two = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("one", "two"))
    assert one.shape == two.shape == (48, 64, 3)
    assert np.abs(one - two).max() <= 1  # uint8 rounding of latents equal within 1e-5


def test_bad_layouts_fail_before_any_process_group(folders):
    t2i, _ = folders
    with pytest.raises(
        ValueError, match=r"tensor_parallel \(--tensor-parallel\) 3 must divide .* 2 attention heads"
    ):
        pipeline.QwenImagePipeline.from_pretrained(t2i, tensor_parallel=3)
    with pytest.raises(ValueError, match=r"number of processes \(1.*must equal .* = 4"):
        pipeline.QwenImagePipeline.from_pretrained(t2i, tensor_parallel=2, cfg_parallel=True)
    with pytest.raises(ValueError, match="do not combine with offload"):
        pipeline.QwenImagePipeline.from_pretrained(t2i, tensor_parallel=2, offload=True)
    with pytest.raises(SystemExit, match="--cfg-parallel .* needs --cfg > 1"):
        cli.main(["generate", "--model", str(t2i), "--prompt", "x", "--cfg", "1", "--cfg-parallel"])

"""__main__.py: `demo` runs end to end, and the tiny checkpoint it writes is a valid official layout
(diffusers' QwenImagePipeline loads it and makes the same image as ours); `generate` errors."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import pipeline


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.png"
    cli.main(["demo", "--out", str(out), "--steps", "3", "--height", "64", "--width", "96"])
    return out


def test_demo_writes_an_image(demo_run, capsys):
    image = Image.open(demo_run)
    assert image.size == (96, 64) and image.mode == "RGB"


def test_demo_checkpoint_loads_in_diffusers_with_the_same_result(demo_run):
    root = demo_run.parent / "tiny-qwen-image"
    ref = QwenImagePipeline.from_pretrained(root)          # lm_head / visual are absent: initialised, unused
    ref.set_progress_bar_config(disable=True)
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    kwargs = dict(prompt="a cat", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=96,
                  num_inference_steps=3, output_type="np")
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
    assert np.abs(got - expected).max() <= 1e-5


def test_generate_errors(tmp_path, demo_run):
    with pytest.raises(SystemExit, match="no such folder"):
        cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="no model_index.json"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    root = str(demo_run.parent / "tiny-qwen-image")
    with pytest.raises(SystemExit, match="height must be at least 16"):
        cli.main(["generate", "--model", root, "--prompt", "x", "--height", "8", "--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli.main(["generate", "--model", root, "--prompt", "x", "--device", "cuda"])


def test_generate_writes_png(tmp_path, demo_run):
    root = str(demo_run.parent / "tiny-qwen-image")
    out = tmp_path / "x.png"
    cli.main(["generate", "--model", root, "--prompt", "a lighthouse", "--height", "48", "--width", "64",
              "--steps", "2", "--device", "cpu", "--out", str(out), "--tiled-vae"])
    assert Image.open(out).size == (64, 48)

"""The command line (__main__.py): `demo` runs end to end, and the tiny checkpoint it writes is a valid official layout
(diffusers' QwenImagePipeline loads it and makes the same image as ours); `generate` errors."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import images, pipeline, sizes


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.png"
    cli.main(["demo", "--random", "--out", str(out), "--steps", "3", "--height", "64", "--width", "96"])
    return out


def test_demo_writes_an_image(demo_run, capsys):
    image = Image.open(demo_run)
    assert image.size == (96, 64) and image.mode == "RGB"


def test_demo_checkpoint_loads_in_diffusers_with_the_same_result(demo_run):
    root = demo_run.parent / "tiny-qwen-image"
    ref = QwenImagePipeline.from_pretrained(root)  # lm_head / visual are absent: initialised, unused
    ref.set_progress_bar_config(disable=True)
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    kwargs = dict(
        prompt="a cat",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=64,
        width=96,
        num_inference_steps=3,
        output_type="np",
    )
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
    assert np.abs(got - expected).max() <= 1e-5


def test_generate_errors(tmp_path, demo_run):
    with pytest.raises(SystemExit, match="no such folder"):
        cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="no model_index.json"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    root = str(demo_run.parent / "tiny-qwen-image")
    with pytest.raises(SystemExit, match="--height 8: must be between 16 and"):
        cli.main(["generate", "--model", root, "--prompt", "x", "--height", "8", "--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli.main(["generate", "--model", root, "--prompt", "x", "--device", "cuda"])


def test_generate_writes_png(tmp_path, demo_run):
    root = str(demo_run.parent / "tiny-qwen-image")
    out = tmp_path / "x.png"
    cli.main(
        [
            "generate",
            "--model",
            root,
            "--prompt",
            "a lighthouse",
            "--height",
            "48",
            "--width",
            "64",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--tiled-vae",
        ]
    )
    assert Image.open(out).size == (64, 48)


@pytest.fixture(scope="module")
def edit_demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("edit_demo") / "edit.png"
    cli.main(
        ["demo", "--edit", "--random", "--out", str(out), "--steps", "2", "--height", "64", "--width", "96"]
    )
    return out


def test_edit_demo_writes_an_image(edit_demo_run):
    assert Image.open(edit_demo_run).size == (96, 64)
    assert Image.open(edit_demo_run.with_name("demo_input.png")).size == (320, 224)


def test_edit_demo_checkpoint_text_encoder_loads_in_transformers(edit_demo_run):
    """The tiny Edit checkpoint's text_encoder/ (language model + vision tower, index + 2 shards) is a valid
    official folder: transformers loads it, and its vision tower gives what ours gives."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenimage_minimal import vision

    folder = edit_demo_run.parent / "tiny-qwen-image-edit" / "text_encoder"
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    tower = vision.load(folder)
    pixels, grid = images.preprocess(sizes.test_picture(), images.ImageProcessorConfig(max_pixels=200 * 200))
    with torch.no_grad():
        expected = ref.model.visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
        got = tower(pixels, [grid])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(ref.model.visual.blocks[0].attn.qkv.weight, tower.blocks[0].attn.qkv.weight)


def test_edit_command(edit_demo_run, tmp_path):
    root = str(edit_demo_run.parent / "tiny-qwen-image-edit")
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    sizes.test_picture(64, 48).save(a)
    sizes.test_picture(40, 60).convert("RGB").save(b)
    out = tmp_path / "edited.png"
    cli.main(
        [
            "edit",
            "--model",
            root,
            "--image",
            str(a),
            str(b),
            "--prompt",
            "swap the colours",
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert Image.open(out).size == (48, 32)


def test_edit_command_errors(edit_demo_run, demo_run, tmp_path):
    root = str(edit_demo_run.parent / "tiny-qwen-image-edit")
    base = ["edit", "--model", root, "--prompt", "x", "--steps", "1", "--device", "cpu"]
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(base + ["--image", str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match="not an image PIL can read"):
        cli.main(base + ["--image", str(tmp_path / "notes.png")])
    sizes.test_picture(32, 32).save(tmp_path / "p.png")
    with pytest.raises(SystemExit, match=r"at most 3 image\(s\), got 4"):
        cli.main(base + ["--image"] + [str(tmp_path / "p.png")] * 4)
    t2i = [
        "edit",
        "--model",
        str(demo_run.parent / "tiny-qwen-image"),
        "--prompt",
        "x",
        "--device",
        "cpu",
        "--image",
        str(tmp_path / "p.png"),
    ]
    with pytest.raises(SystemExit, match="not an Edit pipeline"):
        cli.main(t2i)

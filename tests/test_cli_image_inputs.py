"""The command line's image-conditioned runs: `generate --image [--strength] [--mask]`, `generate --control-image
--controlnet [--control-scale] [--mask]`, `edit --mask`; every argument checked before a model loads, each
mistake one sentence that names the argument and the fix."""

import pytest
from diffusers import QwenImageControlNetModel
from PIL import Image

from conftest import randomize_
from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import mmdit, sizes, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen-Image, a picture, a mask of its size, and ControlNets (plain, inpainting, too wide) for it."""
    root = tmp_path_factory.mktemp("cli_images")
    model = sizes.write_checkpoint(root / "tiny", "tiny")
    config = mmdit.config_from_folder(model / "transformer")
    shape = dict(
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        axes_dims_rope=config.axes_dims_rope,
    )
    for name, extra in (("cn", {}), ("cn_inpaint", dict(extra_condition_channels=4))):
        net = QwenImageControlNetModel(
            num_layers=1, attention_head_dim=config.attention_head_dim, **shape, **extra
        )
        randomize_(net, seed=1).save_pretrained(root / name)
    shape["axes_dims_rope"] = [2 * a for a in config.axes_dims_rope]  # heads twice as wide
    QwenImageControlNetModel(
        num_layers=1, attention_head_dim=2 * config.attention_head_dim, **shape
    ).save_pretrained(root / "cn_wide")
    Image.new("RGB", (48, 32), "orange").save(root / "in.png")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(root / "mask.png")
    Image.new("L", (10, 10), 255).save(root / "small_mask.png")
    return root


def run(tiny, tmp_path, *flags):
    out = tmp_path / "out.png"
    base = [
        "--model",
        str(tiny / "tiny"),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--cfg",
        "1",
        "--device",
        "cpu",
    ]
    cli.main([*flags[:1], *base, "--height", "32", "--width", "48", "--out", str(out), *flags[1:]])
    return Image.open(out)


@pytest.mark.parametrize(
    "flags",
    [
        ["--image", "in.png", "--strength", "0.9", "--mask", "mask.png"],
        [
            "--control-image",
            "in.png",
            "--controlnet",
            "cn_inpaint",
            "--control-scale",
            "0.5",
            "--mask",
            "mask.png",
        ],
    ],
    ids=["inpaint", "controlnet-inpaint"],
)
def test_generate_with_an_image(tiny, tmp_path, flags):
    flags = [str(tiny / f) if f.endswith(".png") or f.startswith("cn") else f for f in flags]
    assert run(tiny, tmp_path, "generate", *flags).size == (48, 32)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--image", "in.png", "--mask", "small_mask.png"],
            "--mask is 10x10 but --image is 48x32: .*resize it",
        ),
        (["--image", "in.png", "--strength", "0"], r"--strength must be a number in \(0, 1\]"),
        (["--image", "in.png", "--strength", "1.5"], r"--strength must be a number in \(0, 1\]"),
        (["--image", "in.png", "--strength", "1e-17"], "--strength 1e-17 leaves none of the 2 steps"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--mask", "mask.png"], "--mask needs --image or --control-image"),
        (["--controlnet", "cn"], "--control-image FILE and --controlnet DIR go together"),
        (["--control-image", "in.png"], "--control-image FILE and --controlnet DIR go together"),
        (["--control-image", "in.png", "--controlnet", "cn_wide"], "made for a transformer with width"),
        (["--control-image", "in.png", "--controlnet", "cn", "--mask", "mask.png"], "needs an inpainting"),
        (["--image", "in.png", "--control-image", "in.png", "--controlnet", "cn"], "exclude each other"),
    ],
)
def test_generate_mistakes_fail_before_the_model_loads(tiny, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(weights, "load_weights", lambda *a, **k: pytest.fail("a model loaded"))
    flags = [str(tiny / f) if f.endswith(".png") or f.startswith("cn") else f for f in flags]
    with pytest.raises(SystemExit, match=message):
        run(tiny, tmp_path, "generate", *flags)


def test_edit_mask_mistakes_fail_before_the_model_loads(tiny, tmp_path, monkeypatch):
    edit = sizes.write_checkpoint(tmp_path / "edit", "tiny", "QwenImageEditPlusPipeline")
    monkeypatch.setattr(weights, "load_weights", lambda *a, **k: pytest.fail("a model loaded"))
    base = ["edit", "--model", str(edit), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o.png")]
    picture = str(tiny / "in.png")
    cases = [
        (
            ["--image", picture, "--mask", str(tiny / "small_mask.png")],
            "--mask is 10x10 but --image is 48x32",
        ),
        (["--image", picture, "--strength", "0.5"], "one --image and its --mask"),
        (["--image", picture, picture, "--mask", str(tiny / "mask.png")], "one --image and its --mask"),
        (["--image", picture, "--mask", str(tiny / "mask.png"), "--strength", "2"], "--strength must be"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli.main([*base, *flags])

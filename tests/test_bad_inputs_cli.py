"""Issue 30 on the command line and the pipelines: one rule for every command that writes, defaults that follow
the model, checks before the model loads, and no run that ends with a black picture and success."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qwenimage_minimal import __main__ as cli
from qwenimage_minimal import nano, pipeline, sizes, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", "tiny")


def test_demo_keeps_an_existing_picture_unless_asked(tmp_path):
    out = tmp_path / "mine.png"
    Image.new("RGB", (8, 8), "red").save(out)
    args = ["demo", "--random", "--out", str(out), "--steps", "1", "--height", "32", "--width", "32"]
    with pytest.raises(SystemExit, match="exists"):
        cli.main(args)
    assert Image.open(out).size == (8, 8)  # untouched
    cli.main([*args, "--overwrite"])  # asked: replaced (make demo passes --overwrite)
    assert Image.open(out).size == (32, 32)


@pytest.mark.skipif(not (nano.COMMITTED / "pipeline_defaults.json").is_file(), reason="no checkpoints/nano")
def test_generate_takes_its_defaults_from_the_model_folder(tmp_path, capsys):
    """The nano folder carries its size, steps, CFG and negative prompt: `generate` with no sampling flag
    draws 128 x 128 (the official defaults would draw 1328 x 1328 for minutes), and a flag still wins."""
    assert pipeline.read_pipeline_defaults(nano.COMMITTED) == dict(
        height=128,
        width=128,
        num_inference_steps=20,
        true_cfg_scale=nano.NanoConfig.eval_cfg,
        negative_prompt="",
    )
    cli.main(
        [
            "generate",
            "--model",
            str(nano.COMMITTED),
            "--prompt",
            "a large red circle at the top left",
            "--out",
            str(tmp_path / "a.png"),
        ]
    )
    assert Image.open(tmp_path / "a.png").size == (128, 128)
    cli.main(
        [
            "generate",
            "--model",
            str(nano.COMMITTED),
            "--prompt",
            "a large red circle at the top left",
            "--width",
            "64",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "b.png"),
        ]
    )
    assert Image.open(tmp_path / "b.png").size == (64, 128)


def test_an_official_folder_keeps_the_official_defaults(tiny):
    assert pipeline.read_pipeline_defaults(tiny) == {}
    assert cli.OFFICIAL_DEFAULTS == dict(
        height=1328, width=1328, num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" "
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"height": "big"}', r"pipeline_defaults.json: height must be a int, got 'big'"),
        ('{"steps": 20}', r"pipeline_defaults.json: unknown key 'steps'"),
        ("[1, 2]", r"pipeline_defaults.json: expected a JSON object"),
        ('{"true_cfg_scale": -1}', r"true_cfg_scale must be a float, got -1"),
    ],
)
def test_a_bad_defaults_file_is_named(tiny, tmp_path, content, message):
    root = tmp_path / "m"
    shutil.copytree(tiny, root)
    (root / "pipeline_defaults.json").write_text(content)
    with pytest.raises(weights.CheckpointError, match=message):
        pipeline.read_pipeline_defaults(root)
    with pytest.raises(SystemExit, match=message):
        cli.main(["generate", "--model", str(root), "--prompt", "x", "--out", str(tmp_path / "x.png")])


def test_a_seed_past_64_bits_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match=r"--seed 18446744073709551616: must be between 0 and 2\*\*64 - 1"):
        cli.main(
            [
                "generate",
                "--model",
                str(tmp_path),
                "--prompt",
                "x",
                "--seed",
                str(2**64),
                "--out",
                str(tmp_path / "x.png"),
            ]
        )


def test_the_lightning_schedule_without_its_lora_or_with_many_steps_warns(tiny, tmp_path):
    args = [
        "generate",
        "--model",
        str(tiny),
        "--prompt",
        "x",
        "--height",
        "32",
        "--width",
        "32",
        "--scheduler",
        "lightning",
        "--out",
        str(tmp_path / "x.png"),
    ]
    with pytest.warns(UserWarning, match="without one .*samples badly"):
        with pytest.warns(UserWarning, match="--steps 3 --cfg 4.0: the Lightning LoRAs are distilled"):
            cli.main([*args, "--steps", "3", "--cfg", "4"])
    assert (tmp_path / "x.png").is_file()


def test_the_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "generate", "edit", "train", "train-nano"):
        assert command in text, command


def test_latents_that_end_non_finite_are_an_error_not_a_black_picture(tiny, tmp_path):
    pipe = pipeline.QwenImagePipeline.from_pretrained(tiny)
    with torch.no_grad():
        pipe.transformer.proj_out.bias.fill_(float("nan"))  # as weights loaded with check_finite=False may be
    for output_type in ("pil", "latent"):
        with pytest.raises(
            FloatingPointError, match="NaN or Inf after the last step, so the picture would be black"
        ):
            pipe(
                prompt="x",
                height=32,
                width=32,
                num_inference_steps=1,
                output_type=output_type,
                progress=False,
            )
    # on the command line such weights are refused when they load: one line, a non-zero exit, no picture
    folder = tmp_path / "nan"
    shutil.copytree(tiny, folder)
    path = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(path)
    state["proj_out.bias"] = torch.full_like(state["proj_out.bias"], float("nan"))
    save_file(state, path)
    config = json.loads((folder / "model_index.json").read_text())
    assert config["_class_name"] == "QwenImagePipeline"
    with pytest.raises(SystemExit, match="error: .*not finite|error: .*NaN"):
        cli.main(
            [
                "generate",
                "--model",
                str(folder),
                "--prompt",
                "x",
                "--height",
                "32",
                "--width",
                "32",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    assert not (tmp_path / "x.png").exists()

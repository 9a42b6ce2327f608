"""The committed nano model (checkpoints/nano, written by `make nano`): it is the real architecture, since
diffusers' QwenImagePipeline loads the folder and draws the same latents, and it draws what prompts it never
saw in training ask for, scored from the pixels (scenes.evaluate)."""

import pytest
import torch

from conftest import max_rel_err
from qwenimage_minimal import nano, pipeline, weights
from qwenimage_minimal.nano import brown, measure, scenes

pytestmark = pytest.mark.skipif(
    not (nano.COMMITTED / "model_index.json").is_file(), reason="checkpoints/nano is not in this checkout"
)


@pytest.fixture(scope="module")
def pipe():
    return pipeline.QwenImagePipeline.from_pretrained(nano.COMMITTED, dtype=torch.float32)  # stored in bf16


def test_the_folder_is_the_official_layout_in_bf16_and_small():
    files = [p for p in nano.COMMITTED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 26e6  # the budget: about 25 MB in all
    for path in nano.COMMITTED.rglob("*.safetensors"):
        header = weights.SafetensorsFile(path)
        assert {header.dtype(n) for n in header.keys()} == {torch.bfloat16}, path
    index = weights.read_config(nano.COMMITTED, "model_index.json")
    assert index["_class_name"] == "QwenImagePipeline"


def test_diffusers_loads_the_folder_and_draws_the_same_latents(pipe):
    from diffusers import QwenImagePipeline

    reference = QwenImagePipeline.from_pretrained(nano.COMMITTED, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    common = dict(
        prompt=list(nano.DEMO_PROMPTS[3:5]),
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=8,
        output_type="latent",
    )
    expected = reference(generator=torch.Generator().manual_seed(0), **common).images
    got = pipe(generator=torch.Generator().manual_seed(0), progress=False, **common).images
    assert got.shape == expected.shape == (2, 64, 16)  # 8 x 8 tokens of 4 channels x 2 x 2
    assert max_rel_err(got, expected) <= 1e-5


def test_held_out_prompts_are_drawn_right(pipe):
    """The committed model's floor on a reduced set (48 held-out scenes: 6 held-out objects, 4 colour pairs never
    together in training; 20 steps, the model's CFG 3 against the empty prompt): colour and place of single
    objects at least 99% (the issue's thresholds), shape at least 90% and two-object scenes at least 85% (the
    issue asks 95% and 90%). This set measures 100 / 100 / 95.2% and 92.6%; the full measurement (200 scenes:
    98.9 / 98.9 / 93.5%, two objects 93.5%) is in checkpoints/nano/report.json."""
    held_out = scenes.make_scenes(48, seed=100, split="held_out")
    got = measure.evaluate(pipe, held_out, steps=20, cfg=nano.NanoConfig.eval_cfg)
    print({k: round(v, 3) for k, v in got.items()})
    assert got["single_colour"] >= 0.99 and got["single_position"] >= 0.99, got
    assert got["single_shape"] >= 0.90 and got["two_objects"] >= 0.85, got


def test_the_demo_draws_a_labelled_grid_with_the_nano_model(tmp_path, capsys):
    from PIL import Image

    from qwenimage_minimal import __main__ as cli

    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out), "--steps", "8"])
    printed = capsys.readouterr().out
    assert "NANO model" in printed and "(held out of training)" in printed
    assert Image.open(out).size[0] == 4 * 2 * 128  # 4 columns of 128 px tiles, enlarged 2x


needs_lora = pytest.mark.skipif(not brown.COMMITTED_LORA.is_file(), reason="no committed brown LoRA")


@needs_lora
def test_the_brown_lora_is_small_diffusers_format_and_loads_in_diffusers_with_equal_latents(pipe):
    from diffusers import QwenImagePipeline

    assert brown.COMMITTED_LORA.stat().st_size <= 1_000_000
    reference = QwenImagePipeline.from_pretrained(nano.COMMITTED, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(brown.COMMITTED_LORA), adapter_name="brown")
    pipe.load_lora_weights(brown.COMMITTED_LORA, adapter_name="brown")
    try:
        common = dict(
            prompt=["a large brown triangle at the bottom right", "a small brown diamond at the top"],
            negative_prompt="",
            true_cfg_scale=2.0,
            height=128,
            width=128,
            num_inference_steps=6,
            output_type="latent",
        )
        expected = reference(generator=torch.Generator().manual_seed(0), **common).images
        got = pipe(generator=torch.Generator().manual_seed(0), progress=False, **common).images
        assert max_rel_err(got, expected) <= 1e-5
    finally:
        pipe.unload_lora_weights()


@needs_lora
def test_the_brown_lora_teaches_brown_in_shapes_and_cells_it_never_saw_and_forgets_nothing():
    """The issue's thresholds on a reduced set (16 prompts each; the full measurement, 32 each, is in
    checkpoints/nano/README.md): brown in the right cell >= 80% with the LoRA, <= 10% without; the eight base
    colours on held-out single objects >= 95% with it loaded."""
    got = brown.measure_lora(nano.COMMITTED, brown.COMMITTED_LORA, n=16)
    assert got["new_brown"] >= 0.8 and got["new_brown_without"] <= 0.1, got
    assert got["base_colours"] >= 0.95, got


@pytest.fixture(scope="module")
def inpaint():
    return pipeline.QwenImageInpaintPipeline.from_pretrained(nano.COMMITTED, dtype=torch.float32)


def test_inpainting_draws_a_held_out_object_in_the_masked_cell_and_keeps_the_rest(inpaint):
    """Inpainting with the committed model (issue 26), on 16 captions it never saw: the new object is drawn in
    the masked cell, the old one kept, and the pixels outside the mask differ from the VAE's round trip by far
    less than the round trip differs from the picture. On 64 cases (notebook 10, checkpoints/nano/README.md,
    CFG 3): 93.8% added (the issue's 90%), 98.4% kept, outside 0.44 of 255 against the round trip's 4.95; this
    set measures 100%, 100%, 0.45 against 4.36."""
    cases = measure.inpainting_cases(16, seed=0)
    assert all(scenes.is_held_out(target) for _, target in cases)
    got = measure.inpainting(inpaint, cases)
    print(got)
    assert got["added"] >= 0.85 and got["kept"] >= 0.9, got
    assert got["outside"] < 0.2 * got["round_trip"], got


class DrawsNothing:
    """An inpainting 'pipeline' that returns the picture's VAE round trip: the masked cell stays empty."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, image, generator, **_):
        latents = self.pipe.picture_latents(image, 128, 128, generator, 1)
        return self.pipe.decode(latents, 128, 128, "np")

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_the_inpainting_measure_says_no_when_nothing_is_drawn(inpaint):
    got = measure.inpainting(DrawsNothing(inpaint), measure.inpainting_cases(4, seed=0))
    assert got["added"] == 0.0 and got["kept"] == 1.0 and got["outside"] == 0.0, got

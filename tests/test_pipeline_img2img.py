"""pipeline.QwenImageImg2ImgPipeline against diffusers' QwenImageImg2ImgPipeline: the tiny random Qwen-Image of
test_pipeline.py, the same picture, prompts, seeds and strengths (fp32, CPU). Both draw the picture's VAE
posterior and then the noise from the one generator, so the final latents and pixels agree to rounding."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import QwenImageImg2ImgPipeline as RefImg2Img
from test_pipeline import HEIGHT, WIDTH, build_reference
from test_scheduler import OFFICIAL as SCHEDULER_CONFIG
from test_vision import random_image

from conftest import max_rel_err
from qwenimage_minimal import pipeline

TOL = 1e-5


def reference_like(t2i, cls):
    """A diffusers pipeline of class `cls` over the T2I reference's components, with its own scheduler (the
    scheduler keeps state between calls)."""
    ref = cls(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=t2i.vae,
        text_encoder=t2i.text_encoder,
        tokenizer=t2i.tokenizer,
        transformer=t2i.transformer,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def last_latents(store):
    """A callback_on_step_end that keeps the latents after each step (both pipelines call it the same way)."""

    def callback(pipe, i, t, tensors):
        store["latents"] = tensors["latents"].clone()
        return tensors

    return callback


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    t2i, folder = build_reference(tmp_path_factory.mktemp("img2img"))
    return reference_like(t2i, RefImg2Img), pipeline.QwenImageImg2ImgPipeline.from_pretrained(folder)


def run_both(pair, seed=0, **kwargs):
    """-> (ours, diffusers') outputs and final latents, each side with the same seed(s)."""
    ref, ours = pair
    gen = lambda: torch.Generator().manual_seed(seed)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=4, **kwargs)
    got_store, expected_store = {}, {}
    expected = ref(generator=gen(), callback_on_step_end=last_latents(expected_store), **common).images
    got = ours(generator=gen(), callback_on_step_end=last_latents(got_store), progress=False, **common).images
    return got, expected, got_store["latents"], expected_store["latents"]


PICTURE = random_image(120, 200, seed=3)  # another size than the output: both resize it (Lanczos)


def test_img2img_with_cfg_pixels_and_latents(pair):
    got, expected, got_z, expected_z = run_both(
        pair,
        prompt="a red fox in the snow",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        image=PICTURE,
        strength=0.7,
        output_type="np",
        seed=1,
    )
    assert got.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert max_rel_err(got_z, expected_z) <= TOL and np.abs(got - expected).max() <= TOL


def test_img2img_batch_of_two_prompts_at_strength_one(pair):
    ref, ours = pair
    prompts = ["a cat", "a dog on a skateboard in Times Square, evening light"]
    common = dict(
        prompt=prompts,
        negative_prompt=[" ", "blurry"],
        true_cfg_scale=3.0,
        image=PICTURE,
        strength=1.0,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
        output_type="latent",
    )
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]
    expected = ref(generator=gens(), **common).images
    got = ours(generator=gens(), progress=False, **common).images
    assert got.shape == (2, 60, 64) and max_rel_err(got, expected) <= TOL


def test_img2img_num_images_per_prompt_with_a_generator_each(pair):
    """One picture, two images of one prompt: the picture's posterior is drawn once, from the first generator,
    then each image's noise from its own (diffusers' order)."""
    ref, ours = pair
    common = dict(
        prompt="a dog wearing a hat",
        image=PICTURE,
        strength=0.5,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        num_images_per_prompt=2,
        true_cfg_scale=1.0,
        output_type="latent",
    )
    gens = lambda: [torch.Generator().manual_seed(s) for s in (8, 9)]
    expected = ref(generator=gens(), **common).images
    got = ours(generator=gens(), progress=False, **common).images
    assert got.shape == (2, 60, 64) and max_rel_err(got, expected) <= TOL


def test_img2img_low_strength_runs_one_step_and_stays_near_the_picture(pair):
    _, ours = pair
    seen = []
    got, expected, _, _ = run_both(
        pair, prompt="a boat", image=PICTURE, strength=0.25, true_cfg_scale=1.0, output_type="pt", seed=2
    )
    assert max_rel_err(got, expected) <= TOL
    ours(
        prompt="a boat",
        image=PICTURE,
        strength=0.25,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        true_cfg_scale=1.0,
        output_type="latent",
        progress=False,
        callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or kw,
    )
    assert len(seen) == 1  # 4 steps at strength 0.25: int(4 - 1) = 3 skipped, as diffusers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0), r"strength must be a number in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be a number in \(0, 1\]"),
        (dict(strength=1e-17), "leaves none of the 4 steps to run"),
        (dict(image=None), "image is required"),
        (dict(image=[PICTURE, PICTURE]), "pass one picture"),
    ],
)
def test_bad_arguments(pair, kwargs, message):
    _, ours = pair
    args = dict(
        prompt="a cat", image=PICTURE, height=HEIGHT, width=WIDTH, num_inference_steps=4, progress=False
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ours(**args)


def test_a_folder_diffusers_saved_as_img2img_loads_here(pair, tmp_path):
    """diffusers' save_pretrained of its img2img pipeline names QwenImageImg2ImgPipeline in model_index.json:
    ours loads that folder (as it loads the official QwenImagePipeline folders) and draws the same latents."""
    ref, ours = pair
    ref.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageImg2ImgPipeline"
    again = pipeline.QwenImageImg2ImgPipeline.from_pretrained(tmp_path / "saved")
    common = dict(
        image=PICTURE, prompt="a cat", true_cfg_scale=1.0, height=HEIGHT, width=WIDTH, num_inference_steps=2
    )
    common.update(output_type="latent", strength=0.5, progress=False)
    expected = ours(generator=torch.Generator().manual_seed(0), **common).images
    assert torch.equal(again(generator=torch.Generator().manual_seed(0), **common).images, expected)

"""pipeline.QwenImageInpaintPipeline and QwenImageEditInpaintPipeline against diffusers' (fp32, CPU): the tiny
random Qwen-Image of test_pipeline.py (and its Edit folder from test_pipeline_edit.py), the same picture, mask,
prompts, seeds, strengths and crops. The final latents are compared through the step callback (which both call
after putting the known region back), the pictures as arrays or, with padding_mask_crop, as PIL images."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import QwenImageEditInpaintPipeline as RefEditInpaint
from diffusers import QwenImageInpaintPipeline as RefInpaint
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint
from PIL import Image
from test_pipeline import HEIGHT, WIDTH, build_reference
from test_pipeline_edit import make_edit_folder
from test_pipeline_img2img import last_latents, reference_like
from test_scheduler import OFFICIAL as SCHEDULER_CONFIG
from test_vision import StubProcessor, random_image

from conftest import max_rel_err
from qwenimage_minimal import images, pipeline

TOL = 1e-5
PICTURE = random_image(120, 200, seed=4)


def box_mask(size, box):
    """An L mask of `size` (w, h), white inside box (x1, y1, x2, y2)."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


MASK = box_mask(PICTURE.size, (60, 30, 130, 90))
SMALL_AREA = 192 * 192  # Edit's ~1024^2 VAE area, shrunk on both sides for speed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    t2i, folder = build_reference(root)
    edit_folder = make_edit_folder(folder, root / "edit", "QwenImageEditPipeline")
    ref_edit = RefEditInpaint(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=t2i.vae,
        text_encoder=t2i.text_encoder,
        tokenizer=t2i.tokenizer,
        processor=StubProcessor(t2i.tokenizer, min_pixels=3136, max_pixels=12845056),
        transformer=t2i.transformer,
    )
    ref_edit.set_progress_bar_config(disable=True)
    return dict(
        ref=reference_like(t2i, RefInpaint),
        ours=pipeline.QwenImageInpaintPipeline.from_pretrained(folder),
        ref_edit=ref_edit,
        ours_edit=pipeline.QwenImageEditInpaintPipeline.from_pretrained(edit_folder),
    )


def run_both(ref, ours, seed=0, generators=None, **common):
    gen = lambda: (
        [torch.Generator().manual_seed(s) for s in generators]
        if generators
        else (torch.Generator().manual_seed(seed))
    )
    got_store, expected_store = {}, {}
    expected = ref(generator=gen(), callback_on_step_end=last_latents(expected_store), **common).images
    got = ours(generator=gen(), callback_on_step_end=last_latents(got_store), progress=False, **common).images
    return got, expected, got_store["latents"], expected_store["latents"]


def test_inpaint_with_cfg_pixels_and_latents(setup):
    got, expected, got_z, expected_z = run_both(
        setup["ref"],
        setup["ours"],
        seed=1,
        prompt="a red fox in the snow",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        image=PICTURE,
        mask_image=MASK,
        strength=0.8,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        output_type="np",
    )
    assert got.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert max_rel_err(got_z, expected_z) <= TOL and np.abs(got - expected).max() <= TOL


def test_inpaint_batch_of_two_prompts_at_strength_one(setup):
    got, expected, _, _ = run_both(
        setup["ref"],
        setup["ours"],
        generators=(7, 8),
        prompt=["a cat", "a dog on a skateboard in Times Square, evening light"],
        negative_prompt=[" ", "blurry"],
        true_cfg_scale=3.0,
        image=PICTURE,
        mask_image=MASK,
        strength=1.0,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
        output_type="latent",
    )
    assert got.shape == (2, 60, 64) and max_rel_err(got, expected) <= TOL


def test_inpaint_padding_mask_crop_pastes_back(setup):
    """A small mask: the crop box around it is inpainted at the full output size and pasted back; outside the
    mask the picture is untouched."""
    small = box_mask(PICTURE.size, (150, 20, 170, 40))
    got, expected, got_z, expected_z = run_both(
        setup["ref"],
        setup["ours"],
        seed=2,
        prompt="a lighthouse",
        image=PICTURE,
        mask_image=small,
        padding_mask_crop=8,
        strength=0.9,
        true_cfg_scale=1.0,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
    )
    assert max_rel_err(got_z, expected_z) <= TOL
    got_px, expected_px = np.asarray(got[0]).astype(int), np.asarray(expected[0]).astype(int)
    assert got[0].size == PICTURE.size and np.abs(got_px - expected_px).max() <= 1  # 8-bit rounding
    outside = np.asarray(small) == 0
    assert (got_px[outside] == np.asarray(PICTURE).astype(int)[outside]).all()


def test_crop_region_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    for box, size, pad in [
        ((60, 30, 130, 90), (160, 96), 8),
        ((0, 0, 5, 100), (96, 160), 0),
        ((150, 100, 200, 120), (64, 64), 30),
    ]:
        mask = box_mask(PICTURE.size, box)
        assert images.crop_region(mask, *size, pad) == VaeImageProcessor.get_crop_region(mask, *size, pad=pad)


@pytest.fixture
def small_edit_area(monkeypatch):
    original = pipeline_qwenimage_edit_inpaint.calculate_dimensions
    monkeypatch.setattr(
        pipeline_qwenimage_edit_inpaint,
        "calculate_dimensions",
        lambda area, ratio: original(SMALL_AREA, ratio),
    )
    monkeypatch.setattr(pipeline.QwenImageEditInpaintPipeline, "vae_area", SMALL_AREA)


def test_edit_inpaint_with_cfg(setup, small_edit_area):
    """Edit-inpaint: the picture's posterior draw is the start and the reference tokens; our prompt embeddings
    on both sides (diffusers' Edit text encoding differs on purpose, see test_pipeline_edit.py)."""
    ours = setup["ours_edit"]
    embeds, mask = ours.encode_prompt("Paint the box blue", PICTURE)
    neg, neg_mask = ours.encode_prompt(" ", PICTURE)
    got, expected, got_z, expected_z = run_both(
        setup["ref_edit"],
        ours,
        seed=3,
        image=PICTURE,
        mask_image=MASK,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=4.0,
        strength=0.75,
        num_inference_steps=4,
        output_type="np",
    )
    w, h = images.calculate_dimensions(SMALL_AREA, PICTURE.width / PICTURE.height)
    assert got.shape == expected.shape == (1, h, w, 3)
    assert max_rel_err(got_z, expected_z) <= TOL and np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=None), "mask_image is required"),
        (dict(mask_image=Image.new("L", (10, 10))), "mask_image is 10x10 but image is 200x120"),
        (dict(strength=0), r"strength must be a number in \(0, 1\]"),
        (dict(strength=2), r"strength must be a number in \(0, 1\]"),
        (dict(padding_mask_crop=4, output_type="np"), "output_type must be 'pil'"),
        (dict(padding_mask_crop=-1), "padding_mask_crop must be a whole number"),
        (dict(padding_mask_crop=4, mask_image=Image.new("L", PICTURE.size)), "mask_image is all black"),
    ],
)
def test_bad_arguments(setup, kwargs, message):
    args = dict(
        prompt="a cat", image=PICTURE, mask_image=MASK, height=HEIGHT, width=WIDTH, num_inference_steps=2
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        setup["ours"](progress=False, **args)

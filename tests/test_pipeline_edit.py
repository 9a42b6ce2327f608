"""The Edit pipelines of pipeline.py against diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline.

Tiny random components in the official layout (the text-to-image reference of test_pipeline.py,
whose Qwen2.5-VL includes a vision tower, plus processor/ and an Edit model_index.json). Both sides
get the same prompt embeddings, computed by ours: diffusers' own text encoding differs on purpose
(it drops `mm_token_type_ids`, see test_vision.py), and that is tested there, not here. fp32, CPU.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image
from test_pipeline import build_reference
from test_vision import StubProcessor, random_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import max_rel_err
from qwenimage_minimal import images, pipeline
from qwenimage_minimal.weights import CheckpointError

TOL = 1e-5
SMALL_VAE_AREA, SMALL_CONDITION_AREA = 192 * 192, 112 * 112  # Edit-2509 areas shrunk on both sides, for speed


def small_size(image):
    """The output size for the shrunk areas (diffusers always sizes the output for 1024^2; pass it)."""
    w, h = images.calculate_dimensions(SMALL_VAE_AREA, image.width / image.height)
    return dict(height=h, width=w)


def make_edit_folder(t2i_folder, dst, class_name, zero_cond_t=False):
    """The T2I reference folder turned into an Edit checkpoint: processor/, model_index.json, (zero_cond_t)."""
    shutil.copytree(t2i_folder, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index.update(_class_name=class_name, processor=["transformers", "Qwen2VLProcessor"])
    (dst / "model_index.json").write_text(json.dumps(index))
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056).save_pretrained(dst / "processor")
    if zero_cond_t:
        config = json.loads((dst / "transformer" / "config.json").read_text())
        (dst / "transformer" / "config.json").write_text(json.dumps({**config, "zero_cond_t": True}))
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    t2i, t2i_folder = build_reference(root)
    folders = {
        "edit": make_edit_folder(t2i_folder, root / "edit", "QwenImageEditPipeline"),
        "plus": make_edit_folder(t2i_folder, root / "plus", "QwenImageEditPlusPipeline"),
        "2511": make_edit_folder(t2i_folder, root / "2511", "QwenImageEditPlusPipeline", zero_cond_t=True),
    }
    parts = dict(
        scheduler=t2i.scheduler,
        vae=t2i.vae,
        text_encoder=t2i.text_encoder,
        tokenizer=t2i.tokenizer,
        processor=StubProcessor(t2i.tokenizer, min_pixels=3136, max_pixels=12845056),
    )
    refs = {
        "edit": QwenImageEditPipeline(transformer=t2i.transformer, **parts),
        "plus": QwenImageEditPlusPipeline(transformer=t2i.transformer, **parts),
        "2511": QwenImageEditPlusPipeline(
            transformer=QwenImageTransformer2DModel.from_pretrained(folders["2511"] / "transformer").eval(),
            **parts,
        ),
    }
    for ref in refs.values():
        ref.set_progress_bar_config(disable=True)
    return refs, folders


@pytest.fixture
def small_plus_areas(monkeypatch):
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", SMALL_VAE_AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", SMALL_CONDITION_AREA)
    monkeypatch.setattr(pipeline.QwenImageEditPlusPipeline, "vae_area", SMALL_VAE_AREA)
    monkeypatch.setattr(pipeline.QwenImageEditPlusPipeline, "condition_area", SMALL_CONDITION_AREA)


def run_both(ref, ours, image, prompt, negative_prompt=None, seed=0, **kwargs):
    """Our embeddings for both; the same noise (generator); final latents of each."""
    embeds, mask = ours.encode_prompt(prompt, image)
    cfg = {}
    if negative_prompt is not None:
        neg, neg_mask = ours.encode_prompt(negative_prompt, image)
        cfg = dict(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
    common = dict(
        image=image,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        **{"num_inference_steps": 3, "output_type": "latent", **cfg, **kwargs},
    )
    expected = ref(generator=torch.Generator().manual_seed(seed), **common).images
    got = ours(generator=torch.Generator().manual_seed(seed), progress=False, **common).images
    return got, expected


def test_from_pretrained_picks_the_class_from_model_index(setup):
    _, folders = setup
    assert (
        type(pipeline.QwenImageEditPipeline.from_pretrained(folders["edit"]))
        is pipeline.QwenImageEditPipeline
    )
    plus = pipeline.QwenImageEditPipeline.from_pretrained(folders["2511"])
    assert type(plus) is pipeline.QwenImageEditPlusPipeline and plus.transformer.config.zero_cond_t
    # the areas diffusers uses are the ones ours uses
    assert pipeline.QwenImageEditPlusPipeline.vae_area == pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE
    assert (
        pipeline.QwenImageEditPlusPipeline.condition_area == pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
    )


def test_edit_one_image_at_the_official_size(setup):
    """Qwen-Image-Edit: a 300x200 image -> 1248x832 (about 1024^2), so 78x52 noise + 78x52 reference tokens."""
    refs, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["edit"])
    image = random_image(200, 300, seed=1)
    got, expected = run_both(
        refs["edit"],
        ours,
        image,
        "Make the sky purple",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
    )
    assert got.shape == expected.shape == (1, 52 * 78, 64)
    assert max_rel_err(got, expected) <= TOL


def test_edit_plus_two_images_of_different_aspect_ratios(setup, small_plus_areas):
    refs, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    pictures = [random_image(200, 300, seed=2), random_image(260, 130, seed=3)]
    got, expected = run_both(
        refs["plus"],
        ours,
        pictures,
        "Put the object of picture 1 into picture 2",
        negative_prompt=" ",
        true_cfg_scale=3.0,
        **small_size(pictures[-1]),
    )
    w, h = images.calculate_dimensions(SMALL_VAE_AREA, 130 / 260)  # the output follows the last image
    assert got.shape == expected.shape == (1, (h // 16) * (w // 16), 64)
    assert max_rel_err(got, expected) <= TOL


def test_edit_2511_zero_cond_t(setup, small_plus_areas):
    refs, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["2511"])
    pictures = [random_image(150, 220, seed=4), random_image(200, 200, seed=5)]
    got, expected = run_both(
        refs["2511"], ours, pictures, "Combine them", true_cfg_scale=1.0, **small_size(pictures[-1])
    )
    assert max_rel_err(got, expected) <= TOL
    # and zero_cond_t changes the result (the same weights without it)
    plain = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    got_plain, _ = run_both(
        refs["plus"], plain, pictures, "Combine them", true_cfg_scale=1.0, **small_size(pictures[-1])
    )
    assert max_rel_err(got_plain, got) > 1e-3


def test_user_size_and_numpy_and_tensor_images(setup, small_plus_areas):
    """height/width other than the image's, and the image as an array or a tensor (converted like a PIL image)."""
    refs, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    pil = random_image(120, 180, seed=6)
    got, expected = run_both(refs["plus"], ours, pil, "Sharpen it", height=128, width=96, true_cfg_scale=1.0)
    assert got.shape == (1, 8 * 6, 64) and max_rel_err(got, expected) <= TOL
    array = np.array(pil)
    for image in (array, torch.from_numpy(array).permute(2, 0, 1).float() / 255):
        again = ours(
            image=image,
            prompt="Sharpen it",
            height=128,
            width=96,
            num_inference_steps=3,
            true_cfg_scale=1.0,
            output_type="latent",
            progress=False,
            generator=torch.Generator().manual_seed(0),
        ).images
        assert torch.equal(again, got)


def test_vision_inputs_match_diffusers_resizing(setup, small_plus_areas):
    """Our prompt encoding of the pictures, with diffusers' (sequential) positions, equals diffusers' own
    encode_prompt: the condition pictures are resized the same way on both sides."""
    refs, folders = setup
    for kind, pictures in (
        ("edit", random_image(200, 300, seed=7)),
        ("plus", [random_image(200, 300, seed=8), random_image(90, 260, seed=9)]),
    ):
        ours = pipeline.QwenImageEditPipeline.from_pretrained(folders[kind])
        ref = refs[kind]
        condition = ours.prepare_images(pictures)[0]
        if kind == "edit":
            expected, _ = ref.encode_prompt("Edit this", image=condition[0], device=torch.device("cpu"))
        else:
            expected, _ = ref.encode_prompt("Edit this", image=condition, device=torch.device("cpu"))
        got, _ = ours.encode_prompt("Edit this", pictures, image_positions="sequential")
        assert got.shape == expected.shape and max_rel_err(got, expected) <= TOL


def test_decoded_image(setup, small_plus_areas):
    refs, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    image = random_image(100, 160, seed=10)
    got, expected = run_both(
        refs["plus"],
        ours,
        image,
        "Make it night",
        output_type="pt",
        true_cfg_scale=1.0,
        num_inference_steps=2,
        **small_size(image),
    )
    assert got.shape == expected.shape and max_rel_err(got, expected) <= TOL
    pil = ours(
        image=image,
        prompt="Make it night",
        num_inference_steps=1,
        progress=False,
        true_cfg_scale=1.0,
        **small_size(image),
    ).images[0]
    assert isinstance(pil, Image.Image) and pil.size == images.calculate_dimensions(SMALL_VAE_AREA, 160 / 100)


@pytest.mark.parametrize(
    "image,match",
    [
        (None, "image is required"),
        ([], "empty list"),
        ("photo.png", "open it first"),
        (Image.new("RGB", (0, 10)), "empty"),
        (Image.new("RGB", (4000, 10)), "over 200:1"),
    ],
)
def test_bad_images(setup, image, match):
    _, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["edit"])
    with pytest.raises((ValueError, TypeError), match=match):
        ours(image=image, prompt="x", num_inference_steps=1, progress=False)


def test_too_many_images(setup):
    _, folders = setup
    edit = pipeline.QwenImageEditPipeline.from_pretrained(folders["edit"])
    with pytest.raises(ValueError, match=r"at most 1 image\(s\), got 2 \(QwenImageEditPlusPipeline"):
        edit(image=[random_image(50, 50)] * 2, prompt="x", num_inference_steps=1, progress=False)
    plus = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    with pytest.raises(ValueError, match=r"at most 3 image\(s\), got 4"):
        plus(image=[random_image(50, 50)] * 4, prompt="x", num_inference_steps=1, progress=False)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_other_image_modes_are_converted(setup, small_plus_areas, mode):
    """Both paths (vision tower and VAE) see the RGB image transformers' processor would make: P and L
    converted, transparency composited on white (here a ramp from transparent to opaque)."""
    _, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    rgb = random_image(64, 96, seed=12)
    if mode == "RGBA":
        rgba = np.array(rgb.convert("RGBA"))
        rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None]
        given = Image.fromarray(rgba, "RGBA")
        white = Image.new("RGBA", given.size, (255, 255, 255, 255))
        expected_input = Image.alpha_composite(white, given).convert("RGB")
    else:
        given = rgb.convert(mode)
        expected_input = given.convert("RGB")
    run = lambda img: (
        ours(
            image=img,
            prompt="x",
            num_inference_steps=1,
            output_type="latent",
            progress=False,
            true_cfg_scale=1.0,
            **small_size(rgb),
            generator=torch.Generator().manual_seed(0),
        ).images
    )
    got = run(given)
    assert torch.equal(got, run(expected_input))
    assert not torch.equal(got, run(rgb))  # the conversion mattered: the test can fail


def test_checkpoint_errors(setup, tmp_path):
    _, folders = setup
    with pytest.raises(CheckpointError, match="not an Edit pipeline"):
        t2i = tmp_path / "t2i"
        shutil.copytree(folders["edit"], t2i)
        index = json.loads((t2i / "model_index.json").read_text())
        (t2i / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImagePipeline"}))
        pipeline.QwenImageEditPipeline.from_pretrained(t2i)
    no_processor = tmp_path / "noproc"
    shutil.copytree(folders["edit"], no_processor)
    shutil.rmtree(no_processor / "processor")
    with pytest.raises(CheckpointError, match="processor/preprocessor_config.json is missing"):
        pipeline.QwenImageEditPipeline.from_pretrained(no_processor)


# ---------------------------------------------------------------------------------------------
# bf16 on a GPU (make cuda-check)
# ---------------------------------------------------------------------------------------------


def mid_size_edit_parity(tmp_path, device, steps=4):
    """Edit-2509 with two images at the official areas (1024^2 VAE / 384^2 vision), a mid-size random
    model (transformer 1536 wide x 4 blocks, text encoder 512 wide, vision tower 1280 wide x 2
    blocks, the official VAE), in bf16 by both pipelines with the same (our bf16) prompt embeddings;
    ours in fp32 as the yardstick. Returns (ours vs diffusers-bf16, ours vs fp32, diffusers vs fp32)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from test_scheduler import OFFICIAL as SCHEDULER_CONFIG
    from test_tokenizer import write_official_tokenizer_folder
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from conftest import randomize_

    tok_folder = write_official_tokenizer_folder(tmp_path / "_tok")
    te = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=151680,
                hidden_size=512,
                intermediate_size=1024,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            ),
            vision_config=dict(
                depth=2,
                hidden_size=1280,
                intermediate_size=3420,
                num_heads=16,
                out_hidden_size=512,
                fullatt_block_indexes=[1],
            ),
        )
    ).eval()
    transformer = QwenImageTransformer2DModel(
        num_layers=4, num_attention_heads=12, joint_attention_dim=512
    ).eval()
    for module, seed in ((te, 1), (transformer, 2)):
        randomize_(module, seed=seed, scale=0.05)
    ae = randomize_(AutoencoderKLQwenImage().eval(), seed=3)
    t2i = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=ae,
        text_encoder=te,
        tokenizer=Qwen2Tokenizer.from_pretrained(tok_folder),
        transformer=transformer,
    )
    t2i.save_pretrained(tmp_path / "t2i")
    shutil.rmtree(tmp_path / "t2i" / "tokenizer")
    write_official_tokenizer_folder(tmp_path / "t2i" / "tokenizer")
    folder = make_edit_folder(tmp_path / "t2i", tmp_path / "mid-edit", "QwenImageEditPlusPipeline")
    del t2i, te, transformer, ae

    pictures = [random_image(600, 900, seed=1), random_image(700, 500, seed=2)]
    prompt = "Put the object of picture 1 into picture 2"
    ours16 = pipeline.QwenImageEditPipeline.from_pretrained(folder, device=device, dtype=torch.bfloat16)
    embeds, mask = ours16.encode_prompt(prompt, pictures)
    neg, neg_mask = ours16.encode_prompt(" ", pictures)
    kwargs = dict(image=pictures, true_cfg_scale=4.0, num_inference_steps=steps, output_type="latent")
    embedded = dict(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
    )
    gen = lambda: torch.Generator().manual_seed(0)
    got = ours16(generator=gen(), progress=False, **embedded, **kwargs).images.float().cpu()
    del ours16
    bf16 = dict(torch_dtype=torch.bfloat16)
    ref16 = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(folder / "vae", **bf16),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder / "text_encoder", dtype=torch.bfloat16
        ),
        tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
        processor=StubProcessor(
            Qwen2Tokenizer.from_pretrained(folder / "tokenizer"), min_pixels=3136, max_pixels=12845056
        ),
        transformer=QwenImageTransformer2DModel.from_pretrained(folder / "transformer", **bf16),
    ).to(device)
    ref16.set_progress_bar_config(disable=True)
    expected = ref16(generator=gen(), **embedded, **kwargs).images.float().cpu()
    del ref16
    ours32 = pipeline.QwenImageEditPipeline.from_pretrained(folder, device=device, dtype=torch.float32)
    truth = (
        ours32(generator=gen(), progress=False, prompt=prompt, negative_prompt=" ", **kwargs)
        .images.float()
        .cpu()
    )
    return max_rel_err(got, expected), max_rel_err(got, truth), max_rel_err(expected, truth)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make cuda-check)")
def test_mid_size_edit_plus_bf16_on_cuda(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    err_vs_ref, err_ours, err_ref = mid_size_edit_parity(tmp_path, "cuda")
    print(
        f"\nEdit-2509 pipeline bf16 cuda, mid-size model, 2 images at the official areas, 4 steps, CFG: final latents "
        f"ours vs diffusers-bf16 {err_vs_ref:.2e}; vs fp32: ours {err_ours:.2e}, diffusers {err_ref:.2e}"
    )
    assert err_vs_ref <= 5e-2
    assert err_ours <= 1.25 * err_ref + 1e-3


def test_batch_of_prompts_equals_one_by_one(setup, small_plus_areas):
    """diffusers' Edit-2509 pipeline refuses batches; ours takes a list of prompts (of different lengths,
    so with a padding mask) and num_images_per_prompt, the reference tokens shared. Each sample must
    equal the same prompt run alone with the same generator."""
    _, folders = setup
    ours = pipeline.QwenImageEditPipeline.from_pretrained(folders["plus"])
    image = random_image(120, 180, seed=13)
    prompts = ["Sharpen it", "Turn the whole scene into a watercolour painting with soft edges"]
    common = dict(
        image=image,
        negative_prompt=" ",
        true_cfg_scale=3.0,
        num_inference_steps=2,
        output_type="latent",
        progress=False,
        **small_size(image),
    )
    seeds = [[0, 1], [2, 3]]
    batch = ours(
        prompt=prompts,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for pair in seeds for s in pair],
        **common,
    ).images
    assert batch.shape[0] == 4
    for p, (prompt, pair) in enumerate(zip(prompts, seeds)):
        for k, seed in enumerate(pair):
            alone = ours(prompt=prompt, generator=torch.Generator().manual_seed(seed), **common).images
            assert max_rel_err(batch[2 * p + k : 2 * p + k + 1], alone) <= TOL

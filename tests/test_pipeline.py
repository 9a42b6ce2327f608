"""pipeline.py against diffusers' QwenImagePipeline: tiny random components in the official layout,
the real tokenizer vocabulary, the same prompts, seeds and sizes (fp32, CPU)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from test_scheduler import OFFICIAL as SCHEDULER_CONFIG
from test_text_encoder import make_reference as make_text_encoder
from test_tokenizer import write_official_tokenizer_folder
from transformers import Qwen2Tokenizer

from conftest import max_rel_err, randomize_
from qwenimage_minimal import pipeline, sampling
from qwenimage_minimal.weights import CheckpointError

TOL = 1e-5
HEIGHT, WIDTH = 96, 160  # non-square: 6 x 10 packed tokens


def build_reference(root):
    """A tiny Qwen-Image in the official folder layout, written by diffusers' save_pretrained."""
    tok_folder = write_official_tokenizer_folder(root / "_tok")
    transformer = randomize_(
        QwenImageTransformer2DModel(
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=64,
            axes_dims_rope=(8, 12, 12),
        ).eval(),
        seed=11,
        scale=0.05,
    )
    ae = randomize_(AutoencoderKLQwenImage(base_dim=16).eval(), seed=12)
    ref = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=ae,
        text_encoder=make_text_encoder(),
        tokenizer=Qwen2Tokenizer.from_pretrained(tok_folder),
        transformer=transformer,
    )
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(root / "qwen-image", max_shard_size="20MB")
    # transformers 5 saves only a tokenizer.json; the official folder has vocab.json + merges.txt + configs
    shutil.rmtree(root / "qwen-image" / "tokenizer")
    write_official_tokenizer_folder(root / "qwen-image" / "tokenizer")
    return ref, root / "qwen-image"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref, folder = build_reference(tmp_path_factory.mktemp("pipe"))
    return ref, pipeline.QwenImagePipeline.from_pretrained(folder), folder


def run_both(pair, **kwargs):
    ref, ours, _ = pair
    seed = kwargs.pop("seed", 0)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=4, **kwargs)
    expected = ref(generator=torch.Generator().manual_seed(seed), **common).images
    got = ours(generator=torch.Generator().manual_seed(seed), progress=False, **common).images
    return got, expected


def test_official_layout_loads(pair):
    _, ours, folder = pair
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    assert not (folder / "tokenizer" / "tokenizer.json").exists()
    assert len(list((folder / "text_encoder").glob("*.safetensors"))) > 1  # sharded


def test_latents_without_cfg(pair):
    got, expected = run_both(pair, prompt="a red fox in the snow", output_type="latent", true_cfg_scale=1.0)
    assert got.shape == expected.shape == (1, 60, 64)
    assert max_rel_err(got, expected) <= TOL


def test_latents_with_cfg(pair):
    got, expected = run_both(
        pair,
        prompt="a red fox in the snow",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        output_type="latent",
        seed=1,
    )
    assert max_rel_err(got, expected) <= TOL
    plain, _ = run_both(
        pair, prompt="a red fox in the snow", output_type="latent", true_cfg_scale=1.0, seed=1
    )
    assert max_rel_err(plain, expected) > 1e-3  # guidance did something


def test_batch_of_two_prompts_of_different_lengths(pair):
    prompts = ["a cat", "a dog on a skateboard in Times Square, evening light, 35 mm photograph"]
    got, expected = run_both(
        pair,
        prompt=prompts,
        negative_prompt=[" ", "blurry"],
        true_cfg_scale=3.0,
        output_type="latent",
        seed=2,
    )
    assert got.shape == (2, 60, 64) and max_rel_err(got, expected) <= TOL


def test_one_negative_prompt_serves_a_batch(pair):
    got, expected = run_both(
        pair,
        prompt=["a cat", "a dog on a skateboard"],
        negative_prompt=[" ", " "],
        output_type="latent",
        seed=4,
    )
    _, ours, _ = pair
    single = ours(
        prompt=["a cat", "a dog on a skateboard"],
        negative_prompt=" ",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        output_type="latent",
        progress=False,
        generator=torch.Generator().manual_seed(4),
    ).images
    assert max_rel_err(got, expected) <= TOL and torch.equal(single, got)


def test_num_images_per_prompt_and_generator_list(pair):
    ref, ours, _ = pair
    common = dict(
        prompt=["a dog wearing a hat"],
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        num_images_per_prompt=3,
        output_type="latent",
        true_cfg_scale=1.0,
    )
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(3)]
    expected = ref(generator=gens(), **common).images
    got = ours(generator=gens(), progress=False, **common).images
    assert got.shape == (3, 60, 64) and max_rel_err(got, expected) <= TOL


def test_num_images_per_prompt_keeps_masks_with_their_prompts(pair):
    """diffusers 0.42.1 repeats the embeddings per prompt ([e0, e0, e1, e1]) but tiles the 2-D mask
    ([m0, m1, m0, m1]), so with prompts of different lengths and num_images_per_prompt > 1 its masks
    belong to the wrong prompts. Ours keeps each mask with its embedding."""
    ref, ours, _ = pair
    prompts = ["a cat", "a dog wearing a hat"]
    embeds, mask = ours.encode_prompt(prompts, num_images_per_prompt=2)
    with torch.no_grad():
        ref_embeds, ref_mask = ref.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=2)
    assert torch.equal(embeds, ref_embeds)
    padding = embeds.abs().sum(-1) == 0
    assert torch.equal(mask == 0, padding)  # ours: mask and padding agree, row by row
    assert not torch.equal(ref_mask == 0, padding)  # diffusers: they do not (the bug)


def test_np_pixels(pair):
    got, expected = run_both(
        pair, prompt="a lighthouse at dawn", negative_prompt=" ", output_type="np", seed=3
    )
    assert got.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(got - expected).max() <= TOL


def test_pil_output(pair):
    _, ours, _ = pair
    images = ours(
        prompt="a lighthouse",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=1,
        progress=False,
        true_cfg_scale=1,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(images) == 1 and images[0].size == (WIDTH, HEIGHT) and images[0].mode == "RGB"


def test_latents_and_prompt_embeds_passed_in(pair):
    ref, ours, _ = pair
    prompts = ["a cat", "a red bicycle leaning on a wall"]
    embeds, mask = ours.encode_prompt(prompts)
    with torch.no_grad():
        ref_embeds, ref_mask = ref.encode_prompt(prompts, device=torch.device("cpu"))
    assert max_rel_err(embeds, ref_embeds) <= TOL and torch.equal(mask, ref_mask)
    noise = torch.randn(2, 60, 64, generator=torch.Generator().manual_seed(5))
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, output_type="latent", true_cfg_scale=1.0)
    expected = ref(
        prompt_embeds=ref_embeds, prompt_embeds_mask=ref_mask, latents=noise.clone(), **common
    ).images
    got = ours(
        prompt_embeds=embeds, prompt_embeds_mask=mask, latents=noise.clone(), progress=False, **common
    ).images
    from_text = ours(prompt=prompts, latents=noise.clone(), progress=False, **common).images
    assert max_rel_err(got, expected) <= TOL
    assert torch.equal(got, from_text)


def test_custom_sigmas_and_callback(pair):
    ref, ours, _ = pair
    seen = []
    common = dict(
        prompt="a boat",
        height=HEIGHT,
        width=WIDTH,
        sigmas=[1.0, 0.75, 0.5, 0.25],
        output_type="latent",
        true_cfg_scale=1.0,
    )
    expected = ref(generator=torch.Generator().manual_seed(7), num_inference_steps=4, **common).images
    got = ours(
        generator=torch.Generator().manual_seed(7),
        progress=False,
        callback_on_step_end=lambda p, i, t, kw: seen.append((i, float(t))) or kw,
        **common,
    ).images
    assert max_rel_err(got, expected) <= TOL
    assert [i for i, _ in seen] == [0, 1, 2, 3] and seen[0][1] == 1000.0


def test_size_rounding_warns_like_the_reference(pair):
    _, ours, _ = pair
    with pytest.warns(UserWarning, match="rounded down to 96x160"):
        out = ours(
            prompt="x",
            height=100,
            width=170,
            num_inference_steps=1,
            output_type="np",
            progress=False,
            true_cfg_scale=1,
        )
    assert out.images.shape == (1, 96, 160, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=8), "height must be at least 16"),
        (dict(width="512"), "width must be an int"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(prompt=""), "prompt must not be empty"),
        (dict(prompt=None), "pass prompt \\(text\\) or prompt_embeds"),
        (dict(output_type="jpeg"), "output_type must be"),
        (dict(generator=[torch.Generator()] * 3), "generator is a list of 3 but the batch has 1"),
        (
            dict(prompt=None, prompt_embeds=torch.zeros(2, 5, 64)),
            "prompt_embeds for a batch needs prompt_embeds_mask",
        ),
        (
            dict(prompt=None, prompt_embeds=torch.zeros(1, 5, 32)),
            "prompt_embeds must be \\(batch, length, 64\\)",
        ),
        (dict(latents=torch.zeros(1, 10, 64)), "latents must be packed noise of shape \\(1, 60, 64\\)"),
        (
            dict(negative_prompt=[" ", " "], true_cfg_scale=4),
            "negative_prompt gives 2 embeddings but prompt gives 1",
        ),
    ],
)
def test_bad_arguments(pair, kwargs, message):
    _, ours, _ = pair
    args = dict(
        prompt="a cat", height=HEIGHT, width=WIDTH, num_inference_steps=1, progress=False, true_cfg_scale=1
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ours(**args)


def test_not_a_checkpoint(tmp_path, pair):
    with pytest.raises(CheckpointError, match="does not exist"):
        pipeline.QwenImagePipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model_index.json"):
        pipeline.QwenImagePipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"component folder\(s\) \['tokenizer', 'text_encoder'"):
        pipeline.QwenImagePipeline.from_pretrained(tmp_path)


def test_cfg_rescale_keeps_the_conditional_norm():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    out = sampling.cfg_combine(cond, uncond, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1))
    direction = uncond + 4.0 * (cond - uncond)
    cos = torch.nn.functional.cosine_similarity(out, direction, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert math.isclose(
        float(sampling.cfg_combine(cond, uncond, 1.0).sub(cond).abs().max()), 0.0, abs_tol=1e-5
    )


def test_offload_gives_the_same_result_and_returns_components(pair):
    _, ours, folder = pair
    offloaded = pipeline.QwenImagePipeline.from_pretrained(folder, device="cpu", offload=True)
    kwargs = dict(
        prompt="a cat",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        output_type="latent",
        true_cfg_scale=1.0,
        progress=False,
    )
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = offloaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)
    assert all(
        p.device.type == "cpu"
        for m in (offloaded.text_encoder, offloaded.transformer, offloaded.vae)
        for p in m.parameters()
    )


def mid_size_parity(tmp_path, device, size=512, steps=4):
    """A mid-size random Qwen-Image (transformer 1536 wide x 4 blocks, text encoder 512 wide, the
    official VAE) run in bf16 by both pipelines; also ours in fp32 as the yardstick."""
    tok_folder = write_official_tokenizer_folder(tmp_path / "_tok")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

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
                depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=512
            ),
        )
    ).eval()
    transformer = QwenImageTransformer2DModel(
        num_layers=4, num_attention_heads=12, joint_attention_dim=512
    ).eval()
    for module, seed in ((te, 1), (transformer, 2)):
        randomize_(module, seed=seed, scale=0.05)
    ae = randomize_(AutoencoderKLQwenImage().eval(), seed=3)
    ref = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=ae,
        text_encoder=te,
        tokenizer=Qwen2Tokenizer.from_pretrained(tok_folder),
        transformer=transformer,
    )
    ref.save_pretrained(tmp_path / "mid")
    shutil.rmtree(tmp_path / "mid" / "tokenizer")
    write_official_tokenizer_folder(tmp_path / "mid" / "tokenizer")
    kwargs = dict(
        prompt=["a red fox in the snow", "a lighthouse at dawn, oil painting"],
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type="latent",
    )
    gen = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]
    ref16 = QwenImagePipeline.from_pretrained(tmp_path / "mid", torch_dtype=torch.bfloat16).to(device)
    ref16.set_progress_bar_config(disable=True)
    expected = ref16(generator=gen(), **kwargs).images.float()
    del ref16
    ours16 = pipeline.QwenImagePipeline.from_pretrained(tmp_path / "mid", device=device, dtype=torch.bfloat16)
    got = ours16(generator=gen(), progress=False, **kwargs).images.float()
    del ours16
    ours32 = pipeline.QwenImagePipeline.from_pretrained(tmp_path / "mid", device=device, dtype=torch.float32)
    truth = ours32(generator=gen(), progress=False, **kwargs).images.float()
    return max_rel_err(got, expected), max_rel_err(got, truth), max_rel_err(expected, truth)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make cuda-check)")
def test_mid_size_pipeline_bf16_on_cuda(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    err_vs_ref, err_ours, err_ref = mid_size_parity(tmp_path, "cuda")
    print(
        f"\npipeline bf16 cuda, mid-size model, 512 px, 4 steps, CFG, batch 2: final latents ours vs diffusers-bf16 "
        f"{err_vs_ref:.2e}; vs fp32: ours {err_ours:.2e}, diffusers {err_ref:.2e}"
    )
    assert err_vs_ref <= 5e-2
    assert err_ours <= 1.25 * err_ref + 1e-3

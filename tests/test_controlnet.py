"""controlnet.py and the ControlNet pipelines against diffusers (fp32, CPU): tiny random ControlNets in diffusers'
folder layout with weights that are NOT zero (a residual left out would show), the tiny Qwen-Image of
test_pipeline.py, the same control images, prompts, seeds, scales and guidance windows."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageMultiControlNetModel,
    QwenImageTransformer2DModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from test_pipeline import HEIGHT, WIDTH, build_reference
from test_pipeline_img2img import last_latents
from test_scheduler import OFFICIAL as SCHEDULER_CONFIG
from test_vision import random_image

from conftest import max_rel_err, randomize_
from qwenimage_minimal import controlnet, mmdit, pipeline
from qwenimage_minimal.weights import CheckpointError

TOL = 1e-5
TINY = dict(num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))  # the tiny MMDiT's


def write_controlnet(folder, seed, num_layers=2, attention_head_dim=32, **config):
    """A random ControlNet (every weight non-zero), saved by diffusers; -> (diffusers' model, its folder)."""
    net = QwenImageControlNetModel(
        num_layers=num_layers, attention_head_dim=attention_head_dim, **{**TINY, **config}
    ).eval()
    randomize_(net, seed=seed, scale=0.05)
    net.save_pretrained(folder)
    return net, folder


class SeveralControlNets(QwenImageMultiControlNetModel):
    """diffusers' multi-ControlNet with several different nets, which its own forward refuses (it takes one
    union net): each net with its image and scale, the residuals summed, as ours does. Test-only."""

    def forward(self, hidden_states, controlnet_cond, conditioning_scale, **kwargs):
        total = None
        for net, image, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            samples = net(
                hidden_states=hidden_states, controlnet_cond=image, conditioning_scale=scale, **kwargs
            )
            total = samples if total is None else [a + b for a, b in zip(total, samples)]
        return total


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    t2i, folder = build_reference(root)
    nets = {
        "a": write_controlnet(root / "cn_a", seed=21),
        "b": write_controlnet(root / "cn_b", seed=22),
        "inpaint": write_controlnet(root / "cn_inpaint", seed=23, extra_condition_channels=4),
    }

    def reference(cls, net):
        ref = cls(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
            vae=t2i.vae,
            text_encoder=t2i.text_encoder,
            tokenizer=t2i.tokenizer,
            transformer=t2i.transformer,
            controlnet=net,
        )
        ref.set_progress_bar_config(disable=True)
        return ref

    return dict(t2i=t2i, folder=folder, nets=nets, reference=reference)


CONTROL = random_image(96, 160, seed=11)
OTHER_CONTROL = random_image(130, 170, seed=12)  # another size: resized (Lanczos) on both sides


def run_both(ref, ours, seed=0, generators=None, **common):
    gen = lambda: (
        [torch.Generator().manual_seed(s) for s in generators]
        if generators
        else (torch.Generator().manual_seed(seed))
    )
    common = dict(height=HEIGHT, width=WIDTH, **common)
    got_store, expected_store = {}, {}
    expected = ref(generator=gen(), callback_on_step_end=last_latents(expected_store), **common).images
    got = ours(generator=gen(), callback_on_step_end=last_latents(got_store), progress=False, **common).images
    return got, expected, got_store["latents"], expected_store["latents"]


# --- the model --------------------------------------------------------------------------------


def test_controlnet_forward_and_the_mmdit_residuals(setup, tmp_path):
    """Our ControlNet's residuals equal diffusers' (padded text, a scale, extra channels); the MMDiT adds K
    residuals to its blocks as diffusers' (3 blocks, 2 residuals: blocks 0, 1 take the first, block 2 the second)."""
    ref_net, folder = setup["nets"]["inpaint"]
    ours = controlnet.load(folder)
    g = torch.Generator().manual_seed(0)
    img, control = torch.randn(2, 60, 64, generator=g), torch.randn(2, 60, 68, generator=g)
    txt, mask = torch.randn(2, 7, 64, generator=g), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    sigma, shapes = torch.tensor([0.7, 0.7]), [(1, 6, 10)]
    with torch.no_grad():
        expected = ref_net(
            hidden_states=img,
            controlnet_cond=control,
            conditioning_scale=0.7,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=shapes,
            return_dict=False,
        )
        got = ours(img, control, txt, mask, sigma, shapes, 0.7)
    assert len(got) == len(expected) == 2
    assert all(max_rel_err(a, b) <= TOL for a, b in zip(got, expected))

    dit = randomize_(QwenImageTransformer2DModel(num_layers=3, attention_head_dim=32, **TINY).eval(), seed=5)
    dit.save_pretrained(tmp_path / "dit")
    residuals = [torch.randn(2, 60, 64, generator=g) for _ in range(2)]
    with torch.no_grad():
        expected = dit(
            hidden_states=img,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=shapes,
            controlnet_block_samples=residuals,
            return_dict=False,
        )[0]
        ours_dit = mmdit.load(tmp_path / "dit")
        got = ours_dit(img, txt, mask, sigma, shapes, controlnet_block_samples=residuals)
        plain = ours_dit(img, txt, mask, sigma, shapes)
    assert max_rel_err(got, expected) <= TOL and max_rel_err(plain, expected) > 1e-3


def test_a_fresh_controlnet_changes_nothing():
    """Zero-initialised embedder and projections: a new ControlNet's residuals are all zero."""
    net = controlnet.QwenImageControlNet(
        controlnet.ControlNetConfig(num_layers=1, attention_head_dim=32, **TINY)
    )
    residuals = net(
        torch.randn(1, 4, 64), torch.randn(1, 4, 64), torch.randn(1, 3, 64), None, 0.5, [(1, 2, 2)]
    )
    assert len(residuals) == 1 and not residuals[0].any()


# --- the pipelines ----------------------------------------------------------------------------


def test_controlnet_with_cfg_and_a_guidance_window(setup):
    ref_net, folder = setup["nets"]["a"]
    ref = setup["reference"](QwenImageControlNetPipeline, ref_net)
    ours = pipeline.QwenImageControlNetPipeline.from_pretrained(setup["folder"], controlnet=folder)
    common = dict(
        prompt="a red fox in the snow",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=4,
        control_image=OTHER_CONTROL,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.25,
        control_guidance_end=0.75,  # steps 1 and 2 of 4
        output_type="np",
    )
    got, expected, got_z, expected_z = run_both(ref, ours, seed=1, **common)
    assert got.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert max_rel_err(got_z, expected_z) <= TOL and np.abs(got - expected).max() <= TOL
    # the residuals matter: without the window's steps the result is another
    common.update(control_guidance_start=0.0, output_type="latent")
    whole = ours(
        generator=torch.Generator().manual_seed(1), height=HEIGHT, width=WIDTH, progress=False, **common
    )
    assert max_rel_err(whole.images, got_z) > 1e-3


def test_a_controlnet_pipeline_diffusers_saved_loads_here_with_its_controlnet(setup, tmp_path):
    """diffusers' save_pretrained of its ControlNet pipeline: model_index.json names QwenImageControlNetPipeline
    and controlnet/ sits beside the other components; ours loads the folder with that ControlNet when none is
    given, and draws diffusers' latents."""
    ref_net, _ = setup["nets"]["a"]
    ref = setup["reference"](QwenImageControlNetPipeline, ref_net)
    ref.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == (
        "QwenImageControlNetPipeline"
    )
    ours = pipeline.QwenImageControlNetPipeline.from_pretrained(tmp_path / "saved")
    assert len(ours.controlnets) == 1
    common = dict(prompt="a red fox", true_cfg_scale=1.0, num_inference_steps=2, control_image=CONTROL)
    common.update(output_type="latent")
    _, _, got_z, expected_z = run_both(ref, ours, **common)
    assert max_rel_err(got_z, expected_z) <= TOL


def test_batched_cfg_gives_both_passes_the_same_residuals(setup):
    """With both CFG passes in one call (as under a memory budget) the residuals are repeated for the batch of 2B:
    the same result as two calls, up to rounding."""
    ours = pipeline.QwenImageControlNetPipeline.from_pretrained(
        setup["folder"], controlnet=setup["nets"]["a"][1]
    )
    kwargs = dict(
        prompt="a cat in a hat",
        negative_prompt=" ",
        control_image=CONTROL,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        output_type="latent",
        progress=False,
    )
    apart = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    ours.batch_cfg = True
    together = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert max_rel_err(together, apart) <= TOL


def test_one_union_controlnet_with_two_images_and_a_batch(setup):
    """diffusers' QwenImageMultiControlNetModel with one net: the net runs once per control image."""
    ref_net, folder = setup["nets"]["a"]
    ref = setup["reference"](QwenImageControlNetPipeline, QwenImageMultiControlNetModel([ref_net]))
    ours = pipeline.QwenImageControlNetPipeline.from_pretrained(setup["folder"], controlnet=[folder])
    got, expected, _, _ = run_both(
        ref,
        ours,
        generators=(3, 4),
        prompt=["a cat", "a dog on a skateboard in Times Square, evening light"],
        negative_prompt=[" ", "blurry"],
        true_cfg_scale=3.0,
        num_inference_steps=3,
        control_image=[CONTROL, OTHER_CONTROL],
        controlnet_conditioning_scale=[0.6, 1.2],
        output_type="latent",
    )
    assert got.shape == (2, 60, 64) and max_rel_err(got, expected) <= TOL


def test_two_controlnets_at_once(setup):
    (net_a, folder_a), (net_b, _) = setup["nets"]["a"], setup["nets"]["b"]
    ref = setup["reference"](QwenImageControlNetPipeline, SeveralControlNets([net_a, net_b]))
    ours = pipeline.QwenImageControlNetPipeline.from_pretrained(
        setup["folder"], controlnet=[folder_a, controlnet.load(setup["nets"]["b"][1])]
    )
    got, expected, _, _ = run_both(
        ref,
        ours,
        seed=5,
        prompt="a lighthouse at dawn",
        true_cfg_scale=1.0,
        num_inference_steps=3,
        control_image=[CONTROL, OTHER_CONTROL],
        controlnet_conditioning_scale=[1.0, 0.5],
        control_guidance_end=[1.0, 0.5],
        output_type="latent",
    )
    assert max_rel_err(got, expected) <= TOL


def test_controlnet_inpaint_with_extra_condition_channels(setup, monkeypatch):
    """diffusers draws the masked picture's posterior outside the generator: replaced by its mean, as ours."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    ref_net, folder = setup["nets"]["inpaint"]
    ref = setup["reference"](QwenImageControlNetInpaintPipeline, ref_net)
    ours = pipeline.QwenImageControlNetInpaintPipeline.from_pretrained(setup["folder"], controlnet=folder)
    mask = Image.new("L", OTHER_CONTROL.size, 0)
    mask.paste(255, (40, 30, 120, 100))
    got, expected, got_z, expected_z = run_both(
        ref,
        ours,
        seed=6,
        prompt="a red door",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=3,
        control_image=OTHER_CONTROL,
        control_mask=mask,
        controlnet_conditioning_scale=0.9,
        output_type="pt",
    )
    assert max_rel_err(got_z, expected_z) <= TOL and max_rel_err(got, expected) <= TOL


# --- bad inputs -------------------------------------------------------------------------------


def test_controlnets_made_for_another_model_fail_before_loading(setup, tmp_path):
    _, wide = write_controlnet(tmp_path / "wide", seed=1, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    with pytest.raises(CheckpointError, match="made for a transformer with width 32.*has width 64"):
        pipeline.QwenImageControlNetPipeline.from_pretrained(setup["folder"], controlnet=wide)
    _, patch = write_controlnet(tmp_path / "patch", seed=1, patch_size=1, in_channels=16)
    with pytest.raises(CheckpointError, match="patch_size 1.*patch_size 2"):
        pipeline.QwenImageControlNetPipeline.from_pretrained(setup["folder"], controlnet=patch)
    with pytest.raises(ValueError, match="controlnet is required"):
        pipeline.QwenImageControlNetPipeline.from_pretrained(setup["folder"])


@pytest.fixture(scope="module")
def two_nets(setup):
    return pipeline.QwenImageControlNetPipeline.from_pretrained(
        setup["folder"], controlnet=[setup["nets"]["a"][1], setup["nets"]["b"][1]]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(control_image=None), "control_image is required"),
        (dict(control_image=[CONTROL] * 3), "3 control image\\(s\\) for 2 ControlNets"),
        (dict(controlnet_conditioning_scale=[1.0]), "has 1 values for 2 control image"),
        (dict(control_guidance_start=0.8, control_guidance_end=0.2), "need 0 <= start < end <= 1"),
    ],
)
def test_bad_arguments(two_nets, kwargs, message):
    ours = two_nets
    args = dict(
        prompt="a cat", control_image=[CONTROL, CONTROL], height=HEIGHT, width=WIDTH, num_inference_steps=2
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ours(progress=False, **args)


def test_inpaint_needs_an_inpainting_controlnet_and_a_mask(setup):
    plain = pipeline.QwenImageControlNetInpaintPipeline.from_pretrained(
        setup["folder"], controlnet=setup["nets"]["a"][1]
    )
    args = dict(prompt="a cat", control_image=CONTROL, height=HEIGHT, width=WIDTH, num_inference_steps=1)
    with pytest.raises(ValueError, match="reads 64 channels but the control tokens have 68"):
        plain(control_mask=Image.new("L", CONTROL.size, 255), progress=False, **args)
    with pytest.raises(ValueError, match="control_mask is required"):
        plain(progress=False, **args)
    with pytest.raises(ValueError, match="control_mask is 10x10 but control_image is 160x96"):
        plain(control_mask=Image.new("L", (10, 10)), progress=False, **args)
    inpainting = pipeline.QwenImageControlNetPipeline.from_pretrained(
        setup["folder"], controlnet=setup["nets"]["inpaint"][1]
    )
    with pytest.raises(ValueError, match="goes with QwenImageControlNetInpaintPipeline"):
        inpainting(progress=False, **args)

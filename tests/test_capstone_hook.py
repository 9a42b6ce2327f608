"""The hook the course's capstone (assignments/capstone.py) swaps a student's pieces in through: MMDiT.use_rope
and the pipelines' `cfg_combine` / `euler_step` attributes, handed to sampling.denoise. With the package's own
functions given explicitly nothing changes, bit for bit; with a wrong one the latents change; use_rope() undoes
a swap. On the committed nano model (CPU, fp32, 3 steps: a second a run)."""

import pytest
import torch

from qwenimage_minimal import mmdit, nano, pipeline, sampling, scheduler, streaming

PROMPTS = ["a large red circle at the top left", "a small blue square in the center"]


@pytest.fixture(scope="module")
def pipe():
    return pipeline.QwenImagePipeline.from_pretrained(nano.COMMITTED, dtype=torch.float32)


def draw(pipe) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS,
        negative_prompt="",
        true_cfg_scale=2.0,
        height=128,
        width=128,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        progress=False,
    ).images  # (2, 64, 16) packed latents


def no_rotation(x, rotations):
    return x


def conjugate_table(positions, axes_dims, theta):  # rotating backwards: a typical mistake
    return mmdit.rope_table(positions, axes_dims, theta).conj()


def no_rescale(v_cond, v_uncond, scale):
    return v_uncond + scale * (v_cond - v_uncond)


def backwards_step(x, v, sigma, sigma_next):
    return x - (sigma_next - sigma) * v


def test_the_package_functions_given_explicitly_change_nothing(pipe):
    default = draw(pipe)
    pipe.transformer.use_rope(table=mmdit.rope_table, apply=mmdit.apply_rope)
    pipe.cfg_combine, pipe.euler_step = sampling.cfg_combine, scheduler.euler_step
    assert torch.equal(draw(pipe), default)


@pytest.mark.parametrize(
    "swap",
    [
        lambda pipe: pipe.transformer.use_rope(apply=no_rotation),
        lambda pipe: pipe.transformer.use_rope(table=conjugate_table),
        lambda pipe: setattr(pipe, "cfg_combine", no_rescale),
        lambda pipe: setattr(pipe, "euler_step", backwards_step),
    ],
    ids=["apply_rope", "rope_table", "cfg_combine", "euler_step"],
)
def test_a_wrong_piece_changes_the_latents_and_the_default_comes_back(pipe, swap):
    default = draw(pipe)
    swap(pipe)
    try:
        changed = draw(pipe)
    finally:  # the pipeline is shared by this file's tests
        pipe.transformer.use_rope()
        pipe.cfg_combine, pipe.euler_step = sampling.cfg_combine, scheduler.euler_step
    assert (changed - default).abs().max() > 1e-2
    assert torch.equal(draw(pipe), default)  # undone: the tables built with the wrong table are gone too


def test_denoise_takes_the_pieces_as_arguments():
    g = torch.Generator().manual_seed(0)
    v_of = torch.randn(3, 5, 8, generator=g)
    model = lambda tokens, embeds, mask, sigma, shapes: v_of * (1 + embeds.mean()) + 0.1 * tokens
    x = torch.randn(3, 5, 8, generator=g)
    cond, uncond = (torch.ones(3, 2, 4), None), (torch.zeros(3, 2, 4), None)
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    run = lambda **pieces: sampling.denoise(model, x, cond, sigmas, [(1, 1, 5)], uncond, 3.0, **pieces)
    default = run()
    assert torch.equal(run(cfg_combine=sampling.cfg_combine, euler_step=scheduler.euler_step), default)
    assert not torch.allclose(run(cfg_combine=no_rescale), default)
    assert not torch.allclose(run(euler_step=backwards_step), default)


def test_use_rope_reaches_the_slots_of_a_weight_streamer():
    model = mmdit.load(nano.COMMITTED / "transformer", dtype=torch.float32)
    block = streaming.nbytes(model.transformer_blocks[0])
    budget = streaming.nbytes(model) - (len(model.transformer_blocks) - streaming.SLOTS) * block
    streamer = streaming.WeightStreamer(model, "cpu", budget, reserve=0)  # room for the slots alone
    assert streamer.streamed == list(range(len(model.transformer_blocks)))
    with streamer.on_device():
        model.use_rope(apply=no_rotation)
        assert streamer.slots and all(slot.attn.apply_rope is no_rotation for slot in streamer.slots)
        model.use_rope()
        assert all(slot.attn.apply_rope is mmdit.apply_rope for slot in streamer.slots)


def test_use_rope_refuses_what_is_not_a_function(pipe):
    with pytest.raises(ValueError, match="apply must be a function or None, got str"):
        pipe.transformer.use_rope(apply="apply_rope")

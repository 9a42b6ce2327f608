"""Streamed transformer weights, batched CFG and regional compilation, on the CPU.

On the CPU the streamer runs the same code as on a GPU minus the streams and events: the streamed
blocks' weights are copied into the slots in order. So a streamed run must equal a resident one bit
for bit; the GPU figures (speed, memory under a budget) come from `make cuda-check`."""

import dataclasses

import pytest
import torch

from conftest import max_rel_err
from qwenimage_minimal import lora, mmdit, pipeline, sampling, sizes, streaming

LAYERS = 7
SIZE = dataclasses.replace(
    sizes.SIZES["tiny"], transformer=dataclasses.replace(sizes.SIZES["tiny"].transformer, num_layers=LAYERS)
)
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("stream") / "qwen-image", SIZE, seed=3)


def budget_for(model, resident: int) -> int:
    """A budget (no activation reserve) that keeps `resident` blocks on the device and streams the rest."""
    block = streaming.nbytes(model.transformer_blocks[0])
    other = streaming.nbytes(model) - LAYERS * block
    return other + (resident + streaming.SLOTS) * block


def model_inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    img = torch.randn(batch, 4 * 6, c.in_channels, generator=g)
    txt = torch.randn(batch, 9, c.joint_attention_dim, generator=g)
    mask = torch.ones(batch, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return img, txt, mask, torch.tensor([0.7, 0.3]), [(1, 4, 6)]


def test_the_plan_streams_what_does_not_fit_spread_evenly(folder):
    model = mmdit.load(folder / "transformer")
    assert streaming.plan(model, budget_for(model, LAYERS), reserve=0) == []
    streamed = streaming.plan(model, budget_for(model, 3), reserve=0)
    assert streamed == [0, 2, 4, 6]  # 4 of 7, never two resident blocks in a row
    assert streaming.plan(model, budget_for(model, 0), reserve=0) == list(range(LAYERS))
    assert streaming.spread(60, 33)[:6] == [0, 2, 4, 6, 8, 10] and len(set(streaming.spread(60, 33))) == 33
    with pytest.raises(ValueError, match="max_gpu_memory=.* too small .* streaming needs at least"):
        streaming.plan(model, budget_for(model, 0) - 1, reserve=0)


@pytest.mark.parametrize("resident", [0, 3, 4])
def test_streamed_forward_equals_resident_bit_for_bit(folder, resident):
    model = mmdit.load(folder / "transformer")
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = model(*inputs)
        streamer = streaming.WeightStreamer(model, "cpu", budget_for(model, resident), reserve=0)
        assert len(streamer.streamed) == LAYERS - resident
        with streamer.on_device():
            got = model(*inputs)
            assert len(streamer.slots) == streaming.SLOTS
            again = model(*inputs)  # the slots wrapped round to the first blocks
        outside = model(*inputs)  # after on_device: the model as it was
    assert torch.equal(got, expected) and torch.equal(again, expected) and torch.equal(outside, expected)
    assert streamer.slots == []


def test_join_prompts_pads_and_masks():
    a = (torch.randn(2, 5, 8), None)
    b = (torch.randn(2, 3, 8), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    embeds, mask = sampling.join_prompts(a, b)
    assert embeds.shape == (4, 5, 8)
    assert torch.equal(embeds[:2], a[0]) and torch.equal(embeds[2:, :3], b[0]) and not embeds[2:, 3:].any()
    assert mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert sampling.join_prompts(a, a)[1] is None  # nothing padded: no mask


def run(pipe, **kwargs):
    args = dict(
        prompt=["a red circle", "two blue squares at the top"],
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
        output_type="latent",
        progress=False,
    )
    return pipe(generator=torch.Generator().manual_seed(0), **{**args, **kwargs}).images


def test_batched_cfg_equals_two_calls(folder):
    pipe = pipeline.QwenImagePipeline.from_pretrained(folder)
    separate = run(pipe)
    pipe.batch_cfg = True
    batched = run(pipe)
    err = max_rel_err(batched, separate)
    print(f"batched CFG vs two calls: max rel err {err:.2e}")
    assert err < 1e-5 and not torch.equal(
        batched, run(pipeline.QwenImagePipeline.from_pretrained(folder), true_cfg_scale=1.0)
    )


def test_pipeline_under_a_budget_equals_the_resident_pipeline(folder):
    resident = pipeline.QwenImagePipeline.from_pretrained(folder)
    resident.batch_cfg = True  # the streamed pipeline batches CFG
    budget = budget_for(resident.transformer, 2) + streaming.ACTIVATION_RESERVE
    streamed = pipeline.QwenImagePipeline.from_pretrained(folder, max_gpu_memory=f"{budget / 2**20}MB")
    assert streamed.batch_cfg and streamed.offload and len(streamed.streamer.streamed) == LAYERS - 2
    assert torch.equal(run(streamed), run(resident))


def test_edit_pipeline_under_a_budget(tmp_path):
    root = sizes.write_checkpoint(tmp_path / "edit", SIZE, pipeline_class="QwenImageEditPlusPipeline", seed=4)
    picture = sizes.test_picture(96, 64)
    args = dict(
        image=[picture, picture],
        prompt="make the circle blue",
        negative_prompt=" ",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        output_type="latent",
        progress=False,
    )
    resident = pipeline.QwenImageEditPipeline.from_pretrained(root)
    resident.batch_cfg = True
    budget = budget_for(resident.transformer, 1) + streaming.ACTIVATION_RESERVE
    streamed = pipeline.QwenImageEditPipeline.from_pretrained(root, max_gpu_memory=budget / 2**30)
    expected = resident(generator=torch.Generator().manual_seed(1), **args).images
    assert torch.equal(streamed(generator=torch.Generator().manual_seed(1), **args).images, expected)


def test_lora_streams_unfused_and_a_partial_lora_asks_for_fuse(folder, tmp_path):
    resident = pipeline.QwenImagePipeline.from_pretrained(folder)
    resident.batch_cfg = True
    budget = budget_for(resident.transformer, 2) + streaming.ACTIVATION_RESERVE
    streamed = pipeline.QwenImagePipeline.from_pretrained(folder, max_gpu_memory=budget / 2**30)
    for pipe in (resident, streamed):  # the same adapter in both, on every block
        lora.add_adapter(pipe.transformer, "style", targets="attention", rank=4)
        for name, p in lora.trainable_parameters(pipe.transformer, "style").items():
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
    assert torch.equal(run(streamed), run(resident))

    partial = pipeline.QwenImagePipeline.from_pretrained(folder, max_gpu_memory=budget / 2**30)
    adapters = {"transformer_blocks.2.attn.to_q": (torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1, 4.0)}
    lora.load_adapter(partial.transformer, adapters, "one_block")
    assert partial.streamer.streamed == [0, 2, 3, 4, 6]
    with pytest.raises(
        ValueError, match=r"bake the LoRA in first \(pipe.fuse_lora\(\); pipe.unload_lora_weights"
    ):
        run(partial)
    partial.fuse_lora()
    partial.unload_lora_weights()
    baked = pipeline.QwenImagePipeline.from_pretrained(folder)
    baked.batch_cfg = True
    lora.load_adapter(baked.transformer, adapters, "one_block")
    assert max_rel_err(run(partial), run(baked)) < 1e-5  # fused vs beside the weight: rounding


def test_bad_budgets_are_named(folder):
    with pytest.raises(ValueError, match="max_gpu_memory must be a positive size"):
        pipeline.QwenImagePipeline.from_pretrained(folder, max_gpu_memory="lots")
    with pytest.raises(ValueError, match="max_gpu_memory must be a positive size"):
        streaming.parse_memory(-3)
    with pytest.raises(ValueError, match="too small for this transformer"):
        pipeline.QwenImagePipeline.from_pretrained(folder, max_gpu_memory="1MB")
    assert (
        streaming.parse_memory(24)
        == streaming.parse_memory("24GB")
        == streaming.parse_memory("24 GiB")
        == 24 * 2**30
    )
    assert streaming.parse_memory("512MB") == 2**29


def test_compiled_blocks_equal_eager(folder):
    """The plumbing of regional compilation (one graph for every block), with the backend that needs no
    C++ compiler; inductor's speed and numerics are measured on the GPU (make cuda-check)."""
    torch._dynamo.reset()
    model = mmdit.load(folder / "transformer")
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = model(*inputs)
        mmdit.compile_blocks(model, backend="aot_eager")
        got = model(*inputs)
        streamer = streaming.WeightStreamer(model, "cpu", budget_for(model, 3), reserve=0)
        streamer.compile_options = dict(backend="aot_eager")
        with streamer.on_device():
            streamed = model(*inputs)
    assert torch.equal(got, expected) and torch.equal(streamed, expected)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # not one per block


def test_an_fp8_folder_loads_in_the_pipeline_and_streams(folder, tmp_path):
    """weights_convert.py --dtype fp8 writes the transformer in fp8; from_pretrained keeps it in fp8 (half the
    bytes), and its streamed run equals its resident one."""
    import shutil

    import weights_convert
    from qwenimage_minimal import fp8

    root = tmp_path / "qwen-image-fp8"
    shutil.copytree(folder, root, ignore=shutil.ignore_patterns("transformer"))
    weights_convert.convert(folder / "transformer", root / "transformer", dtype=fp8.FP8, log=lambda *a: None)
    resident = pipeline.QwenImagePipeline.from_pretrained(root)
    plain = pipeline.QwenImagePipeline.from_pretrained(folder)
    assert any(isinstance(m, fp8.FP8Linear) for m in resident.transformer.modules())
    assert streaming.nbytes(resident.transformer) < 0.55 * streaming.nbytes(
        plain.transformer.to(torch.bfloat16)
    )
    resident.batch_cfg = True
    budget = budget_for(resident.transformer, 2) + streaming.ACTIVATION_RESERVE
    streamed = pipeline.QwenImagePipeline.from_pretrained(root, max_gpu_memory=budget / 2**30)
    assert len(streamed.streamer.streamed) == LAYERS - 2
    assert torch.equal(run(streamed), run(resident))


def test_command_line_budget_needs_a_gpu(folder, tmp_path):
    from qwenimage_minimal import __main__ as cli

    with pytest.raises(SystemExit, match="--gpu-memory 24 needs a CUDA device"):
        cli.main(
            [
                "generate",
                "--model",
                str(folder),
                "--prompt",
                "a red circle",
                "--device",
                "cpu",
                "--gpu-memory",
                "24",
                "--out",
                str(tmp_path / "a.png"),
            ]
        )


def test_slots_follow_each_blocks_lora_scales_and_work_with_grad_enabled(folder):
    """A LoRA's alpha / r and scale are plain numbers per layer, not tensors: the slots must take them from the
    block they run. Outside torch.no_grad (the docstring's usage) streaming must work too."""
    model = mmdit.load(folder / "transformer")
    g = torch.Generator().manual_seed(0)
    adapters = {
        f"transformer_blocks.{i}.attn.to_q": (
            torch.randn(4, 64, generator=g) * 0.1,
            torch.randn(64, 4, generator=g) * 0.1,
            float(1 + 3 * i),
        )
        for i in range(LAYERS)
    }  # another alpha on every block
    lora.load_adapter(model, adapters, "varied")
    inputs = model_inputs(model)
    expected = model(*inputs)
    streamer = streaming.WeightStreamer(model, "cpu", budget_for(model, 3), reserve=0)
    with streamer.on_device():
        got = model(*inputs)  # grad enabled
        assert all(not p.requires_grad for slot in streamer.slots for p in slot.parameters())
    assert streamer.streamed == [0, 2, 4, 6] and torch.equal(got, expected)
    model.streamer = None
    layer = model.transformer_blocks[0].attn.to_q
    lora.fuse(model)
    assert layer.weight_before_fusing is not None
    assert (
        streaming.empty_like_block(model.transformer_blocks[0], "cpu").attn.to_q.weight_before_fusing is None
    )

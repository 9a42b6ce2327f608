"""scheduler.py against diffusers' FlowMatchEulerDiscreteScheduler driven as QwenImagePipeline drives it."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from qwenimage_minimal import scheduler
from qwenimage_minimal.weights import CheckpointError

# The official Qwen/Qwen-Image scheduler/scheduler_config.json.
OFFICIAL = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
OFFICIAL.update(base_shift=0.5, max_shift=0.9, shift_terminal=0.02)
OFFICIAL_FIELDS = {
    k: v
    for k, v in OFFICIAL.items()
    if k
    in (
        "num_train_timesteps",
        "base_image_seq_len",
        "max_image_seq_len",
        "base_shift",
        "max_shift",
        "shift_terminal",
        "use_dynamic_shifting",
        "shift",
        "time_shift_type",
    )
}
# Qwen-Image-Lightning's scheduler: constant shift 3 (base = max = ln 3), no terminal stretch.
LIGHTNING = {**OFFICIAL, "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}


def reference_schedule(config: dict, steps: int, image_seq_len: int):
    """What diffusers' QwenImagePipeline.__call__ computes (sigmas linspace -> calculate_shift -> set_timesteps)."""
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(
        image_seq_len,
        ref.config.base_image_seq_len,
        ref.config.max_image_seq_len,
        ref.config.base_shift,
        ref.config.max_shift,
    )
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return ref


@pytest.fixture(params=["official", "lightning"])
def scheduler_folder(request, tmp_path):
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps(OFFICIAL if request.param == "official" else LIGHTNING)
    )
    return request.param, tmp_path


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # diffusers, 1 step
@pytest.mark.parametrize("steps", [1, 4, 8, 50])
@pytest.mark.parametrize("image_seq_len", [256, 4096, 6889])
def test_sigmas_and_timesteps_match_diffusers(scheduler_folder, steps, image_seq_len):
    name, folder = scheduler_folder
    ours = scheduler.load(folder)
    ours.set_timesteps(steps, image_seq_len)
    ref = reference_schedule(OFFICIAL if name == "official" else LIGHTNING, steps, image_seq_len)
    if name == "official" and steps == 1:
        # diffusers stretches a one-step schedule [1.0] by 0/0 and gets NaN; ours keeps [1, 0].
        assert torch.isnan(ref.sigmas[0])
        assert ours.sigmas.tolist() == [1.0, 0.0]
        return
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == (steps + 1,)
    assert ours.timesteps.shape == (steps,)
    assert (ours.sigmas - ref.sigmas).abs().max() <= 1e-6
    assert (ours.timesteps - ref.timesteps).abs().max() <= 1e-6 * 1000
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0


def test_lightning_config_is_a_constant_shift_of_3():
    ours = scheduler.FlowMatchEulerScheduler(scheduler.lightning_config())
    for seq_len in (256, 4096):
        ours.set_timesteps(4, seq_len)
        s = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
        torch.testing.assert_close(ours.sigmas[:-1].double(), 3 * s / (1 + 2 * s), atol=1e-6, rtol=0)


def test_official_schedule_ends_on_terminal():
    ours = scheduler.FlowMatchEulerScheduler()
    ours.set_timesteps(50, 6889)
    assert abs(ours.sigmas[-2].item() - 0.02) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_diffusers(dtype):
    steps, seq_len = 8, 1024
    ours = scheduler.FlowMatchEulerScheduler(scheduler.SchedulerConfig())
    ours.set_timesteps(steps, seq_len)
    ref = reference_schedule(OFFICIAL, steps, seq_len)
    ref.set_begin_index(0)
    g = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(2, 64, 64, generator=g).to(dtype)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 64, 64, generator=g).to(dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(v, i, x_ours)
        assert x_ours.dtype == x_ref.dtype == dtype
        assert (x_ours.float() - x_ref.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_custom_sigmas_match_diffusers():
    custom = [1.0, 0.8, 0.5, 0.2]
    ours = scheduler.FlowMatchEulerScheduler()
    ours.set_timesteps(image_seq_len=4096, sigmas=custom)
    ref = FlowMatchEulerDiscreteScheduler.from_config(OFFICIAL)
    ref.set_timesteps(sigmas=custom, mu=calculate_shift(4096, 256, 8192, 0.5, 0.9))
    assert (ours.sigmas - ref.sigmas).abs().max() <= 1e-6


def test_training_schedule_is_the_reference_schedule_unshifted():
    """diffusers' DreamBooth script loads the scheduler with shift=3.0 and indexes its __init__ schedule:
    with the official config (dynamic shifting on) that schedule is t / 1000, not shifted."""
    ref = FlowMatchEulerDiscreteScheduler.from_config(OFFICIAL, shift=3.0)
    timesteps, sigmas = scheduler.training_schedule(scheduler.SchedulerConfig(**OFFICIAL_FIELDS), shift=3.0)
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas)
    assert sigmas[0] == 1.0 and abs(sigmas[-1].item() - 0.001) < 1e-9 and (sigmas[:-1] - sigmas[1:] > 0).all()
    # Without dynamic shifting, the shift does bend it, as in the reference.
    fixed = {**OFFICIAL, "use_dynamic_shifting": False}
    ref = FlowMatchEulerDiscreteScheduler.from_config(fixed, shift=3.0)
    timesteps, sigmas = scheduler.training_schedule(
        scheduler.SchedulerConfig(**{**OFFICIAL_FIELDS, "use_dynamic_shifting": False}), shift=3.0
    )
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(timesteps, ref.timesteps, rtol=0, atol=1e-4)
    assert sigmas[500] > 0.74  # shift 3 at the middle: 1.5 / 2 = 0.75


def test_bad_arguments():
    s = scheduler.FlowMatchEulerScheduler()
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        s.set_timesteps(0, 256)
    with pytest.raises(ValueError, match="image_seq_len is required"):
        s.set_timesteps(4)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(torch.zeros(1), 0, torch.zeros(1))
    s.set_timesteps(4, 256)
    with pytest.raises(IndexError, match="step_index 4 out of range"):
        s.step(torch.zeros(1), 4, torch.zeros(1))


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="scheduler_config.json not found"):
        scheduler.load(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**OFFICIAL, "use_karras_sigmas": True}))
    with pytest.raises(CheckpointError, match="use_karras_sigmas"):
        scheduler.load(tmp_path)
    broken = {k: v for k, v in OFFICIAL.items() if k != "max_shift"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="max_shift"):
        scheduler.load(tmp_path)

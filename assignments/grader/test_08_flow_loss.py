"""Lesson 08's assignment (assignments/flow_loss.py): the noise levels training draws, the straight path, its
velocity and the loss, against the package (qwenimage_minimal.train.flow_matching_loss, run with a stand-in
model that records its input) and diffusers' compute_density_for_timestep_sampling and scale_noise."""

from types import SimpleNamespace

import pytest
import torch

from conftest import check, load
from qwenimage_minimal import mmdit, scheduler, train

flow = load("flow_loss")
g = torch.Generator().manual_seed(0)
SCHEDULE = scheduler.training_schedule(scheduler.SchedulerConfig())  # (timesteps, sigmas), t = 1000 ... 1
B, C, H, W = 3, 4, 6, 10  # latents; 3 x 5 tokens of 2 x 2


class StandIn(torch.nn.Module):
    """Takes the MMDiT's place in train.flow_matching_loss: keeps the noisy tokens, answers `prediction`."""

    config = SimpleNamespace(patch_size=2)

    def __init__(self, prediction):
        super().__init__()
        self.prediction = mmdit.pack_latents(prediction)  # (B, N, 4C), as the MMDiT answers

    def forward(self, tokens, prompt_embeds, prompt_mask, timestep, img_shapes):
        self.tokens = tokens
        return self.prediction


def package_step(x0, noise, u, prediction, scheme="none"):
    """(x_sigma, loss) as train.flow_matching_loss computes them for these draws."""
    model = StandIn(prediction)
    loss = train.flow_matching_loss(model, x0, noise, u, None, None, SCHEDULE, weighting_scheme=scheme)
    return mmdit.unpack_latents(model.tokens, H, W), loss


def latents(dtype=torch.float32):
    return [torch.randn(B, C, H, W, generator=g).to(dtype) for _ in range(3)]  # x0, noise, prediction


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.7), (-1.0, 2.0)])
def test_logit_normal_matches_the_package_and_diffusers(mean, std):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    seed = lambda: torch.Generator().manual_seed(1)  # the same draws for the three
    n = torch.normal(0.0, 1.0, (4096,), generator=seed())
    expected = train.timestep_density("logit_normal", 4096, mean, std, generator=seed())
    got = flow.logit_normal_u(n, mean, std)
    check(
        f"logit_normal_u(n, {mean}, {std})",
        got,
        expected,
        mistakes=[
            (mean + std * n, "u is the normal draw itself: u = sigmoid(logit_mean + logit_std n), in (0, 1)"),
            (
                torch.sigmoid(n),
                "logit_mean and logit_std are left out: u = sigmoid(logit_mean + logit_std n)",
            ),
            (torch.sigmoid(-mean + std * n), "logit_mean has the wrong sign: logit(u) ~ N(logit_mean, std²)"),
        ],
        atol=1e-6,
    )
    reference = compute_density_for_timestep_sampling("logit_normal", 4096, mean, std, generator=seed())
    check(f"logit_normal_u(n, {mean}, {std}) against diffusers", got, reference, atol=1e-6)


def test_training_sigmas_are_picked_from_the_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    edges = torch.tensor([0.0, 0.0005, 0.001, 0.4999, 0.5, 0.9989, 0.9995, 1.0])  # u = 1: the last entry
    u = torch.cat([edges, torch.rand(500, generator=g)])
    expected = train.pick_timesteps(u, SCHEDULE)[1]
    got = flow.training_sigmas(u)
    check(
        "training_sigmas(u)",
        got,
        expected,
        mistakes=[
            (u, "sigma = u: the schedule runs from t = 1000 down, so u = 0 is pure noise and sigma ≈ 1 - u"),
            (1 - u, "sigma = 1 - u exactly: u picks an entry of the schedule, 1 - int(1000 u) / 1000"),
            (1 - (1000 * u).round() / 1000, "1000 u is rounded: the index is truncated, int(1000 u)"),
            (
                torch.where(u == 1, 0.0, expected),
                "u = 1 gave sigma = 0: it must take the last entry, sigma = 0.001 (clamp the index to 999)",
            ),
        ],
        atol=1e-7,
    )
    script = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)  # as the script loads it
    below_1 = u < 1  # the script indexes timesteps[int(1000 u)], then takes their sigmas
    check("training_sigmas against the script's", got[below_1], script.sigmas[(u[below_1] * 1000).long()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_noisy_latents_match_the_package(dtype):
    (x0, noise, prediction), u = latents(dtype), torch.rand(B, generator=g)
    sigma = train.pick_timesteps(u, SCHEDULE)[1]  # (B,): a level per sample
    expected, _ = package_step(x0, noise, u, prediction)
    s = sigma.view(B, 1, 1, 1).to(dtype)
    check(
        f"noisy_latents(x0, noise, sigma) in {dtype}",
        flow.noisy_latents(x0, noise, sigma),
        expected,
        mistakes=[
            (s * x0 + (1 - s) * noise, "the path runs the wrong way: sigma = 0 is the image, 1 pure noise"),
            (x0 + s * noise, "noise was added to the whole image: the path interpolates, (1 - sigma) x0"),
        ],
        atol=1e-5 if dtype == torch.float32 else 2e-2,
    )


def test_the_path_and_its_velocity_match_diffusers_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler()  # its sigmas: 1, 0.999, ..., 0.001
    x0, noise, _ = latents()
    index = torch.tensor([0, 317, 999])  # sigma = 1, 0.683, 0.001
    expected = reference.scale_noise(x0, reference.timesteps[index], noise)
    check("noisy_latents against diffusers", flow.noisy_latents(x0, noise, reference.sigmas[index]), expected)
    at = lambda i: reference.scale_noise(x0, reference.timesteps[[i] * B], noise)  # x at sigma = 1 - i / 1000
    slope = (at(250) - at(750)) / 0.5  # from sigma = 0.25 to 0.75: d x_sigma / d sigma, diffusers' path
    check(
        "velocity_target(x0, noise)",
        flow.velocity_target(x0, noise),
        slope,
        mistakes=[(x0 - noise, "the velocity has the wrong sign: d/dsigma of (1 - sigma) x0 + sigma noise")],
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "scheme, dtype", [("none", torch.float32), ("sigma_sqrt", torch.float32), ("cosmap", torch.bfloat16)]
)
def test_the_loss_matches_the_package(scheme, dtype):
    (x0, noise, prediction), u = latents(dtype), torch.rand(B, generator=g)
    _, expected = package_step(x0, noise, u, prediction, scheme)
    weight = train.loss_weighting(scheme, train.pick_timesteps(u, SCHEDULE)[1])  # (B,), ones for "none"
    got = flow.flow_matching_loss(prediction, x0, noise, None if scheme == "none" else weight)
    error = (prediction.float() - (noise - x0).float()) ** 2  # (B, C, H, W)
    flipped = (prediction.float() - (x0 - noise).float()) ** 2  # with the target x0 - noise
    w = weight.view(B, 1, 1, 1)
    check(
        f"flow_matching_loss, weighting {scheme!r}, {dtype}",
        got,
        expected,
        mistakes=[
            ((w * flipped).mean(), "the target has the wrong sign: the velocity is noise - x0"),
            ((w * error).sum() / B, "the loss is summed over the elements: take their mean"),
            (
                (w**2 * error).mean(),
                "the weight is inside the square: w (prediction - target)², not (w ...)²",
            ),
            ((w * error).mean() * B / weight.sum(), "the loss is divided by the sum of the weights"),
        ],
        rtol=1e-5 if dtype == torch.float32 else 1e-2,
    )


def test_a_perfect_prediction_costs_nothing():
    x0, noise, _ = latents()
    loss = flow.flow_matching_loss(noise - x0, x0, noise, torch.rand(B, generator=g))
    check("flow_matching_loss(noise - x0, x0, noise, weight)", loss, torch.tensor(0.0))

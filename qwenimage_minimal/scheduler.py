"""The flow-matching Euler scheduler: which noise levels to visit, and how to step between them.

Flow matching trains the model on straight paths between data and noise,

    x_sigma = (1 - sigma) * x0 + sigma * noise,     sigma in [0, 1],

so the velocity dx/dsigma = noise - x0 is what the MMDiT predicts. Sampling integrates that ODE
from sigma = 1 (pure noise) to 0 with Euler steps: x <- x + (sigma_next - sigma) * v.

Which sigmas? Start evenly spaced, sigma_k = linspace(1, 1/N, N), then *shift* them towards 1
(more steps at high noise), by more for bigger images, since a bigger image at the same sigma
still shows more of its structure. Qwen-Image uses the exponential shift

    sigma' = e^mu / (e^mu + (1/sigma - 1)),     mu linear in the token count:
    mu = 0.5 at 256 tokens (256 px) ... 0.9 at 8192 tokens (extrapolated beyond),

then stretches the schedule so its last value is exactly `shift_terminal` (0.02), and appends 0.
A constant shift s is the same formula with mu = ln s (Qwen-Image-Lightning uses s = 3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import weights


@dataclass
class SchedulerConfig:
    """Defaults are the official Qwen-Image scheduler/scheduler_config.json."""

    num_train_timesteps: int = 1000
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift_terminal: float | None = 0.02
    use_dynamic_shifting: bool = True
    shift: float = 1.0  # used only when use_dynamic_shifting is False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}"
            )
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")

    def to_json(self) -> dict:
        """scheduler/scheduler_config.json, as diffusers writes it."""
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.42.1",
            **asdict(self),
        }


def lightning_config() -> SchedulerConfig:
    """Qwen-Image-Lightning (4/8-step distilled LoRAs): a constant shift of 3, no terminal stretch."""
    return SchedulerConfig(base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)


def compute_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """mu grows linearly with the number of image tokens (interpolated, or extrapolated)."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (image_seq_len - config.base_image_seq_len)


def shift_sigmas(sigmas: torch.Tensor, mu: float, time_shift_type: str = "exponential") -> torch.Tensor:
    """Push sigmas towards 1: s' = e^mu / (e^mu + 1/s - 1) (the "linear" variant uses mu for e^mu)."""
    strength = math.exp(mu) if time_shift_type == "exponential" else mu
    return strength / (strength + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale (1 - sigma) so the last sigma lands exactly on `terminal`; the first stays 1."""
    one_minus = 1 - sigmas
    return 1 - one_minus * (1 - terminal) / one_minus[-1]


MAX_STEPS = 1000  # the training schedule's timesteps: more steps would revisit the same noise levels


def check_steps(num_inference_steps) -> None:
    """The one check of a step count (the command line calls it too, before any model loads)."""
    if (
        not isinstance(num_inference_steps, int)
        or isinstance(num_inference_steps, bool)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps > MAX_STEPS:
        raise ValueError(f"num_inference_steps must be at most {MAX_STEPS}, got {num_inference_steps}")


def get_schedule(
    config: SchedulerConfig, num_inference_steps: int | None, image_seq_len: int | None = None, sigmas=None
) -> torch.Tensor:
    """The sigmas to visit: (N + 1,) float32, from ~1 down, the last one 0.

    `sigmas` replaces the default linspace(1, 1/N, N) before shifting, as in diffusers.
    Computed in float64 and stored in float32 (the reference computes in float32; the two agree
    to ~1e-7)."""
    c = config
    if sigmas is None:
        check_steps(num_inference_steps)
        sigmas = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=torch.float64)
        sigmas = sigmas.to(torch.float32).to(torch.float64)  # the reference rounds its inputs to fp32
    else:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 1 or not ((sigmas > 0) & (sigmas <= 1)).all():
            raise ValueError("sigmas must be a non-empty 1-D sequence of values in (0, 1]")
        if not (sigmas[1:] < sigmas[:-1]).all():
            raise ValueError(
                f"sigmas must decrease strictly (from noise towards the image), got {sigmas.tolist()}"
            )
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(sigmas)} sigmas were given")

    if c.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError(
                "image_seq_len is required: the shift depends on the number of image tokens "
                "((height // 16) * (width // 16) for one image)"
            )
        sigmas = shift_sigmas(sigmas, compute_mu(image_seq_len, c), c.time_shift_type)
    else:
        sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
    if c.shift_terminal and sigmas[-1] < 1:
        # A one-step schedule is just [1]: there is nothing to stretch (diffusers divides 0 by 0
        # here and returns NaN; we keep the single step at sigma = 1).
        sigmas = stretch_to_terminal(sigmas, c.shift_terminal)
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1)])


def euler_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """x + (sigma_next - sigma) * v: one step along the predicted straight path.

    The sum is taken in fp32 and cast back to the velocity's dtype. Like the reference, the
    product dt * v stays in v's dtype (a 0-d fp32 tensor does not promote a bf16 one), so a
    bf16 run matches diffusers bit for bit."""
    return (x.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


class FlowMatchEulerScheduler:
    """diffusers' FlowMatchEulerDiscreteScheduler interface over get_schedule and euler_step."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.sigmas: torch.Tensor | None = None  # (N + 1,) float32, decreasing, last = 0
        self.timesteps: torch.Tensor | None = None  # (N,) = sigmas[:-1] * 1000, what the pipeline reports

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        image_seq_len: int | None = None,
        sigmas=None,
        device=None,
    ) -> torch.Tensor:
        """Compute the schedule for `num_inference_steps` steps at `image_seq_len` image tokens (get_schedule)."""
        schedule = get_schedule(self.config, num_inference_steps, image_seq_len, sigmas)
        self.timesteps = (schedule[:-1] * self.config.num_train_timesteps).to(device)
        self.sigmas = schedule.to(device)
        return self.timesteps

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from sigmas[i] to sigmas[i+1] (euler_step)."""
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps(...) before step(...)")
        if not 0 <= step_index < len(self.sigmas) - 1:
            raise IndexError(f"step_index {step_index} out of range for {len(self.sigmas) - 1} steps")
        return euler_step(sample, velocity, self.sigmas[step_index], self.sigmas[step_index + 1])


def training_schedule(config: SchedulerConfig, shift: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels training draws from: (timesteps (1000,), sigmas (1000,)), t = 1000, 999, ..., 1.

    This is the schedule diffusers' FlowMatchEulerDiscreteScheduler builds in __init__, which the
    DreamBooth script indexes (loaded with shift=3.0). With the official config's
    use_dynamic_shifting=True that shift is never applied: sigma = t / 1000, uniform. Only a config
    without dynamic shifting bends it: sigma' = s sigma / (1 + (s - 1) sigma)."""
    n = config.num_train_timesteps
    sigmas = torch.arange(n, 0, -1, dtype=torch.float32) / n  # 1, 0.999, ..., 0.001
    if not config.use_dynamic_shifting:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * n, sigmas


UNSUPPORTED_FLAGS = (
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


def load(path) -> FlowMatchEulerScheduler:
    """Read an official `scheduler/` folder (scheduler_config.json)."""
    raw = weights.read_config(path, "scheduler_config.json")
    if raw.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise weights.CheckpointError(
            f"{path}: expected a FlowMatchEulerDiscreteScheduler config, got {raw['_class_name']}"
        )
    required = ("use_dynamic_shifting",) + (
        ("base_shift", "max_shift") if raw.get("use_dynamic_shifting") else ()
    )
    config = weights.config_from_json(
        SchedulerConfig,
        raw,
        path,
        required,
        must_be_false=UNSUPPORTED_FLAGS,
        filename="scheduler_config.json",
    )
    return FlowMatchEulerScheduler(config)

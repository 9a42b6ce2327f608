"""Training benchmark: one LoRA training step, ours (train.flow_matching_loss + lora.py) vs the diffusers recipe
(train_dreambooth_lora_qwen_image.py: diffusers + PEFT) in the same process, same weights, same inputs.

    python benchmarks/bench_train.py                 # CPU, fp32, 2 full-width blocks, 256 image + 32 text tokens
    python benchmarks/bench_train.py --size tiny --img-tokens 256 --batch 2     # the tiny model, 256x256 px
    python benchmarks/bench_train.py --device cuda --dtype bf16 --blocks 60 --img-tokens 4096 --txt-tokens 256 \\
        --gradient-checkpointing                     # the full transformer at 1024x1024 (one 80 GB card)

One step = forward + flow-matching loss + backward + AdamW step + zero_grad, LoRA rank 16 (alpha = rank) on
the script's default targets to_k, to_q, to_v, to_out.0, optionally with per-block gradient checkpointing.
Trainable weights are fp32 in both (ours by design; diffusers' via cast_training_params), the frozen ones in
--dtype. Each side's optimizer is the one its recipe builds: AdamW lr 1e-4, weight decay 1e-4, fused on
CUDA for ours (train.make_optimizer), torch's default for the script. Gradient clipping is not timed.

Weights: the reference is built on the meta device and materialised on --device directly (to_empty, then
every parameter filled with normal_(0, 0.02) in a fixed order under a fixed seed: no CPU copy, no init
pass), and ours takes the very same tensors (load_state_dict(assign=True)). Sharing the frozen weights is
safe (neither side changes them; each has its own LoRA parameters and optimizer) and is the memory-efficient
choice: the 60-block transformer is 41 GB in bf16, and shared it fits one card with both sides resident,
so the two are timed alternately, one step each per round, median over --repeats after --warmup.
The first step's loss of the two is compared (the adapters start equal: PEFT's initial values are copied
into ours by name); in fp32 it must agree to 1e-4 relative.

Memory is measured per implementation in a fresh subprocess (this script with a hidden --only), which
builds the same weights and only its own model and runs two steps: on CUDA torch.cuda.max_memory_allocated
(reset after the frozen weights are built), on CPU the peak RSS (ru_maxrss). Both are reported whole and
above the frozen weights (adapters, optimizer state, activations, gradients); the ratio is of the latter.
The subprocesses run before the main process touches the device, so on a GPU only one model is ever there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_seconds_alternating  # noqa: E402

from qwenimage_minimal import lora, mmdit, scheduler, sizes, train, weights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's default lora_layers
REF_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "axes_dims_rope",
)
LOSS_TOL = 1e-4  # first-step loss, relative, fp32
OFFICIAL_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)


def model_config(a) -> mmdit.MMDiTConfig:
    base = sizes.SIZES["tiny"].transformer if a.size == "tiny" else mmdit.MMDiTConfig()
    return dataclasses.replace(base, num_layers=a.blocks)


def build_weights(config: mmdit.MMDiTConfig, device, dtype, seed: int = 0):
    """diffusers' transformer with deterministic random weights, materialised on `device` without a CPU copy."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(**{f: getattr(config, f) for f in REF_FIELDS})
    # Its RoPE tables are plain tensor attributes, not buffers: made on meta above, so rebuilt for real.
    ref.pos_embed = type(ref.pos_embed)(theta=10000, axes_dim=list(config.axes_dims_rope), scale_rope=True)
    ref = ref.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    return ref.requires_grad_(False)


def add_reference_lora(ref, a):
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    ref.add_adapter(
        LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    cast_training_params(ref, dtype=torch.float32)  # trainable weights in fp32 (a no-op in fp32)
    if a.gradient_checkpointing:
        ref.enable_gradient_checkpointing()
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)  # the script's AdamW


def make_ours(ref, config, a, device):
    """Ours on the reference's frozen tensors (shared, not copied), with its own fp32 adapter."""
    ours = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    ours.load_state_dict(ref.state_dict(), assign=True)
    ours.requires_grad_(False)
    lora.add_adapter(ours, "default", "diffusers", a.rank, a.rank)
    ours.gradient_checkpointing = a.gradient_checkpointing
    ours.train()
    opt = torch.optim.AdamW(
        lora.trainable_parameters(ours).values(),
        lr=1e-4,
        weight_decay=1e-4,
        fused=(device.type == "cuda") or None,
    )
    return ours, opt


def token_grid(a) -> tuple[int, int]:
    """The image's token grid (rows, columns); the latent is twice that, the picture 16 times."""
    side = int(a.img_tokens**0.5)
    return side, a.img_tokens // side


def make_inputs(config, a, device, dtype, seed=1):
    """Latents as the script holds them (B, C, 1, h, w) and as ours takes them (B, C, h, w); prompt embeddings;
    the mask only if --pad-tokens pads the batch's last prompt (an all-ones mask is None, as encode_prompt does)."""
    gh, gw = token_grid(a)
    C = config.latent_channels
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(a.batch, C, 1, 2 * gh, 2 * gw, generator=g)
    noise = torch.randn(a.batch, C, 1, 2 * gh, 2 * gw, generator=g)
    embeds = torch.randn(a.batch, a.txt_tokens, config.joint_attention_dim, generator=g)
    u = torch.rand(a.batch, generator=g)  # weighting scheme "none": uniform
    mask = None
    if a.pad_tokens:
        mask = torch.ones(a.batch, a.txt_tokens, dtype=torch.long)
        mask[-1, a.txt_tokens - a.pad_tokens :] = 0
        embeds[-1, a.txt_tokens - a.pad_tokens :] = 0
        mask = mask.to(device)
    return dict(
        x0=x0.to(device, dtype),
        noise=noise.to(device, dtype),
        u=u,
        embeds=embeds.to(device, dtype),
        mask=mask,
    )


def reference_loss(transformer, noise_scheduler, inp):
    """The script's step from `indices = ...` to `loss = loss.mean()` (weighting scheme "none", no prior)."""
    from diffusers import QwenImagePipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    model_input, noise, u = inp["x0"], inp["noise"], inp["u"]
    device = model_input.device

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = noise_scheduler.timesteps.to(device)
        timesteps = timesteps.to(device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    bsz = model_input.shape[0]
    indices = (u * noise_scheduler.config.num_train_timesteps).long()
    timesteps = noise_scheduler.timesteps[indices].to(device=device)
    sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    img_shapes = [(1, model_input.shape[3] // 2, model_input.shape[4] // 2)] * bsz
    noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
    packed_noisy_model_input = QwenImagePipeline._pack_latents(
        noisy_model_input,
        batch_size=bsz,
        num_channels_latents=model_input.shape[1],
        height=model_input.shape[3],
        width=model_input.shape[4],
    )
    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        encoder_hidden_states=inp["embeds"],
        encoder_hidden_states_mask=inp["mask"],
        timestep=timesteps / 1000,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    model_pred = QwenImagePipeline._unpack_latents(
        model_pred, model_input.shape[3] * 8, model_input.shape[4] * 8, 8
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
    )
    return loss.mean()


def step_fns(ref, ref_opt, ours, ours_opt, inp):
    """{name: one training step} -> the step's loss (a detached tensor)."""
    fns = {}
    if ref is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(OFFICIAL_SCHEDULER, shift=3.0)

        def step_ref():
            loss = reference_loss(ref, noise_scheduler, inp)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            return loss.detach()

        fns["diffusers"] = step_ref
    if ours is not None:
        schedule = scheduler.training_schedule(scheduler.SchedulerConfig())
        x0, noise = inp["x0"][:, :, 0], inp["noise"][:, :, 0]

        def step_ours():
            loss = train.flow_matching_loss(
                ours, x0, noise, inp["u"], inp["embeds"], inp["mask"], schedule, "none"
            )
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad()
            return loss.detach()

        fns["ours"] = step_ours
    return fns


def rss_kb() -> int:
    return next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )


def measure_only(a, device, dtype):
    """--only ours|ref: in a fresh process, the peak memory of two training steps of one implementation."""
    import diffusers.training_utils  # noqa: F401   every import both sides use, before the baseline:
    import peft  # noqa: F401                        an import is not training memory
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline  # noqa: F401

    config = model_config(a)
    inp = make_inputs(config, a, device, dtype)
    ref = build_weights(config, device, dtype)
    if device.type == "cuda":  # the frozen weights: what "above the weights" starts from
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_kb() * 1024
    if a.only == "ours":  # ours takes the tensors; the diffusers module goes
        ours, ours_opt = make_ours(ref, config, a, device)
        ref, ref_opt = None, None
    else:
        ref_opt = add_reference_lora(ref, a)
        ours, ours_opt = None, None
    (fn,) = step_fns(ref, ref_opt, ours, ours_opt, inp).values()
    for _ in range(2):  # the second step has the optimizer's state too
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "base_bytes": base}))


def measure_memory(a, argv) -> dict:
    out = {}
    for which, key in (("ours", "ours"), ("ref", "diffusers")):
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--only", which], capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(f"memory subprocess --only {which} failed:\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"peak_mb_{key}"] = r["peak_bytes"] / 2**20
        out[f"peak_above_weights_mb_{key}"] = (r["peak_bytes"] - r["base_bytes"]) / 2**20
    out["peak_ratio"] = out["peak_mb_ours"] / out["peak_mb_diffusers"]
    out["peak_above_weights_ratio"] = (
        out["peak_above_weights_mb_ours"] / out["peak_above_weights_mb_diffusers"]
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        choices=("full", "tiny"),
        default="full",
        help="block width: the official one, or sizes.SIZES['tiny']",
    )
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks (the official model has 60)")
    p.add_argument(
        "--img-tokens", type=int, default=256, help="image tokens (256: 256x256 px; 4096: 1024x1024)"
    )
    p.add_argument("--txt-tokens", type=int, default=32)
    p.add_argument(
        "--pad-tokens",
        type=int,
        default=0,
        help="padding at the end of the batch's last prompt (then a mask is passed); 0: no mask",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the frozen weights and inputs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    p.add_argument("--json")
    p.add_argument("--only", choices=("ours", "ref"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if not 0 <= a.pad_tokens < a.txt_tokens:
        p.error("--pad-tokens must be in [0, --txt-tokens)")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    if a.only:
        return measure_only(a, device, dtype)

    config = model_config(a)
    gh, gw = token_grid(a)
    result = {
        "size": a.size,
        "blocks": a.blocks,
        "dim": config.dim,
        "rank": a.rank,
        "batch": a.batch,
        "img_tokens": gh * gw,
        "txt_tokens": a.txt_tokens,
        "pad_tokens": a.pad_tokens,
        "device": str(device),
        "dtype": a.dtype,
        "gradient_checkpointing": a.gradient_checkpointing,
        "threads": torch.get_num_threads(),
    }
    json_at = [i for i, s in enumerate(argv) if s == "--json" or s.startswith("--json=")]
    child_argv = [
        s
        for i, s in enumerate(argv)
        if not any(i == j or (i == j + 1 and argv[j] == "--json") for j in json_at)
    ]
    if not a.skip_memory:  # first: nothing of ours is on the device yet
        result |= measure_memory(a, child_argv)

    inp = make_inputs(config, a, device, dtype)
    ref = build_weights(config, device, dtype)
    ours, ours_opt = make_ours(ref, config, a, device)  # before PEFT renames the reference's Linears
    ref_opt = add_reference_lora(ref, a)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, q in lora.trainable_parameters(ours).items():
            q.copy_(ref_params[name])  # PEFT's initial A (gaussian) and B (0), by name
    result["trainable_params"] = sum(q.numel() for q in lora.trainable_parameters(ours).values())
    fns = step_fns(ref, ref_opt, ours, ours_opt, inp)

    first = {k: fn().item() for k, fn in fns.items()}  # the first step: same weights, same inputs
    rel = abs(first["ours"] - first["diffusers"]) / abs(first["diffusers"])
    last = {}
    timed = {k: (lambda k=k, fn=fn: last.__setitem__(k, fn())) for k, fn in fns.items()}
    t = median_seconds_alternating(timed, device, a.repeats, warmup=a.warmup)
    steps = 1 + a.warmup + a.repeats
    result |= {
        "step_s_ours": t["ours"],
        "step_s_diffusers": t["diffusers"],
        "step_ratio": t["ours"] / t["diffusers"],
        "first_loss_ours": first["ours"],
        "first_loss_diffusers": first["diffusers"],
        "first_loss_rel_diff": rel,
        "first_loss_within_tol": rel <= LOSS_TOL,
        "steps": steps,
        "last_loss_ours": last["ours"].item(),
        "last_loss_diffusers": last["diffusers"].item(),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    tokens = f"{a.batch} x ({gh * gw} image + {a.txt_tokens} text tokens)"
    print(
        f"# LoRA training step: {a.size} width ({config.dim}), {a.blocks} blocks, rank {a.rank} on "
        f"{'/'.join(TARGETS)} ({result['trainable_params'] / 1e6:.2f} M fp32 parameters), {device} {a.dtype}, "
        f"{tokens} ({16 * gh}x{16 * gw} px), gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, "
        f"AdamW, {torch.get_num_threads()} threads" + (f", {result['gpu']}" if "gpu" in result else "")
    )
    verdict = ("yes" if rel <= LOSS_TOL else "NO") + ("" if a.dtype == "fp32" else ", required only in fp32")
    print(
        f"first-step loss: ours {first['ours']:.7f}, diffusers {first['diffusers']:.7f}, rel diff {rel:.1e} "
        f"(within {LOSS_TOL:g}: {verdict}); after {steps} steps: ours {result['last_loss_ours']:.7f}, "
        f"diffusers {result['last_loss_diffusers']:.7f}"
    )
    unit = "GiB allocated" if device.type == "cuda" else "MiB RSS"
    scale = 1024 if device.type == "cuda" else 1
    ms = lambda s: f"{1e3 * s:.1f} ms" if s < 0.1 else f"{1e3 * s:.0f} ms"
    rows = [
        (
            f"step time (median of {a.repeats}, alternating)",
            ms(t["ours"]),
            ms(t["diffusers"]),
            f"{result['step_ratio']:.3f}x",
        )
    ]
    if not a.skip_memory:
        for label, key in (("peak", "peak"), ("peak above the frozen weights", "peak_above_weights")):
            rows.append(
                (
                    f"{label}, {unit}",
                    f"{result[f'{key}_mb_ours'] / scale:.2f}",
                    f"{result[f'{key}_mb_diffusers'] / scale:.2f}",
                    f"{result[f'{key}_ratio']:.3f}x",
                )
            )
    widths = [
        max(len(r[i]) for r in rows + [("measurement", "ours", "diffusers + PEFT", "ratio")])
        for i in range(4)
    ]
    for r in [("measurement", "ours", "diffusers + PEFT", "ratio")] + rows:
        print("  ".join(s.ljust(w) for s, w in zip(r, widths)))
    if a.dtype == "fp32" and rel > LOSS_TOL:
        print(f"WARNING: the first-step losses differ by {rel:.1e} > {LOSS_TOL:g}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

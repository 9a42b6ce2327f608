"""Text-to-image pipeline benchmarks: the tiny random model end to end, ours vs diffusers in the same
process, and the peak memory of `from_pretrained` relative to the weights' bytes.

    python benchmarks/bench_pipeline.py [--steps 8] [--size 256]

The tiny checkpoint is the one `make demo` writes (every component, official layout, the real
tokenizer vocabulary). Both pipelines run the same prompt, negative prompt, seed and size with
true CFG; their images are compared. Memory: a fresh subprocess loads the pipeline and reports its
peak RSS above what it held before, divided by the bytes of all safetensors files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_seconds  # noqa: E402

from qwenimage_minimal import pipeline, sampling, sizes  # noqa: E402

LOAD_SNIPPET = r"""
import resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
rss = lambda: next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
import torch
if sys.argv[1] == "ours":
    from qwenimage_minimal import pipeline
    before = rss(); pipe = pipeline.QwenImagePipeline.from_pretrained(sys.argv[2])
else:
    from diffusers import QwenImagePipeline
    before = rss(); pipe = QwenImagePipeline.from_pretrained(sys.argv[2])
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_step(device, dtype, size, blocks, txt_tokens, repeats):
    """One denoising step with true CFG (two transformer calls, combine, Euler) at `size` px with a
    full-width transformer of `blocks` blocks: ours vs diffusers' transformer + its CFG arithmetic
    + FlowMatchEulerDiscreteScheduler.step, the same weight tensors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from qwenimage_minimal import mmdit, scheduler, weights

    torch.manual_seed(0)
    with torch.device(device):
        ref = QwenImageTransformer2DModel(num_layers=blocks).to(dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = weights.build_on_meta(lambda: mmdit.MMDiT(mmdit.MMDiTConfig(num_layers=blocks)))
    ours.load_state_dict(ref.state_dict(), assign=True)
    h = w = size // 16
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, h * w, 64, generator=g, device=device, dtype=dtype)
    txt, neg = (torch.randn(1, txt_tokens, 3584, generator=g, device=device, dtype=dtype) for _ in range(2))
    sch = scheduler.FlowMatchEulerScheduler()
    sch.set_timesteps(50, h * w, device=device)
    ref_sch = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02
    )
    ref_sch.set_timesteps(
        sigmas=np.linspace(1, 1 / 50, 50), mu=scheduler.compute_mu(h * w, sch.config), device=device
    )

    def step_ours():
        sigma = sch.timesteps[0].expand(1).to(dtype) / 1000
        v = sampling.cfg_combine(
            ours(x, txt, None, sigma, [(1, h, w)]), ours(x, neg, None, sigma, [(1, h, w)]), 4.0
        )
        return sch.step(v, 0, x)

    def step_ref():
        t = ref_sch.timesteps[0]
        sigma = t.expand(1).to(dtype) / 1000
        cond = ref(x, txt, None, sigma, [[(1, h, w)]], return_dict=False)[0]
        uncond = ref(x, neg, None, sigma, [[(1, h, w)]], return_dict=False)[0]
        comb = uncond + 4.0 * (cond - uncond)
        v = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        ref_sch._step_index = 0
        return ref_sch.step(v, t, x, return_dict=False)[0]

    with torch.no_grad():
        err = (step_ours().float() - step_ref().float()).abs().max().item()
        t_ref = median_seconds(step_ref, device, repeats, warmup=3)
        t_ours = median_seconds(step_ours, device, repeats, warmup=3)
    result = {
        "step_size": size,
        "step_blocks": blocks,
        "step_ms_ours": 1e3 * t_ours,
        "step_ms_diffusers": 1e3 * t_ref,
        "step_ratio": t_ours / t_ref,
        "step_max_abs_diff": err,
    }
    print(
        f"one CFG step, {size}x{size}, {blocks} full-width blocks, {txt_tokens} text tokens: ours "
        f"{result['step_ms_ours']:.1f} ms, diffusers {result['step_ms_diffusers']:.1f} ms, ratio "
        f"{result['step_ratio']:.3f}x; max |diff| {err:.1e}"
    )
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-device", help="also time one denoising step with full-width blocks on this device")
    p.add_argument("--step-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--step-size", type=int, default=1024)
    p.add_argument("--step-blocks", type=int, default=4)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    result = {}
    if a.step_device:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.step_dtype]
        result.update(bench_step(torch.device(a.step_device), dtype, a.step_size, a.step_blocks, 128, 10))
    if a.skip_tiny:
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
        return result
    from diffusers import QwenImagePipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error(), tlogging.set_verbosity_error()

    print(
        f"# pipeline benchmark, tiny random Qwen-Image, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = sizes.write_checkpoint(Path(tmp) / "tiny", "tiny")
        ours = pipeline.QwenImagePipeline.from_pretrained(root)
        ref = QwenImagePipeline.from_pretrained(root)
        ref.set_progress_bar_config(disable=True)
        kwargs = dict(
            prompt="a corgi wearing sunglasses",
            negative_prompt=" ",
            true_cfg_scale=4.0,
            height=a.size,
            width=a.size,
            num_inference_steps=a.steps,
            output_type="np",
        )
        run_ours = lambda: ours(generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
        run_ref = lambda: ref(generator=torch.Generator().manual_seed(0), **kwargs).images
        err = float(np.abs(run_ours() - run_ref()).max())
        cpu = torch.device("cpu")
        t_ref, t_ours = median_seconds(run_ref, cpu, a.repeats), median_seconds(run_ours, cpu, a.repeats)
        result.update(
            {
                "size": a.size,
                "steps": a.steps,
                "ms_ours": 1e3 * t_ours,
                "ms_diffusers": 1e3 * t_ref,
                "ratio": t_ours / t_ref,
                "max_abs_pixel_diff": err,
            }
        )
        print(
            f"{a.size}x{a.size}, {a.steps} steps with CFG: ours {result['ms_ours']:.0f} ms, diffusers "
            f"{result['ms_diffusers']:.0f} ms, ratio {result['ratio']:.3f}x (goal <= 1.0); max |pixel diff| {err:.1e}"
        )
        weight_bytes = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        for which in ("ours", "diffusers"):
            out = subprocess.run(
                [sys.executable, "-c", LOAD_SNIPPET, which, str(root), str(ROOT)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            result[f"load_peak_mb_{which}"] = (int(out[-1]) - int(out[-2])) / 1024
            result[f"load_peak_ratio_{which}"] = result[f"load_peak_mb_{which}"] * 2**20 / weight_bytes
        print(
            f"from_pretrained peak RSS above baseline: ours {result['load_peak_mb_ours']:.0f} MB "
            f"({result['load_peak_ratio_ours']:.1f}x the {weight_bytes / 2**20:.0f} MB of weights), diffusers "
            f"{result['load_peak_mb_diffusers']:.0f} MB ({result['load_peak_ratio_diffusers']:.1f}x). At this size "
            "fixed costs dominate (the 151k-token tokenizer, imports); per component the weights load at "
            "~1.0x (see bench_mmdit.py)"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

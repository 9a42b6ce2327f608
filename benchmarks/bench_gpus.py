"""The full transformer on the GPUs people have: one 50-step-schedule CFG step at 1328x1328, ours vs
diffusers on the same card in the same run, resident, compiled, streamed under a memory budget, fp8.

    python benchmarks/bench_gpus.py [--blocks 60] [--size 1328] [--budget 24] [--json out.json]
    python benchmarks/bench_gpus.py --device cpu --blocks 3 --size 128 --budgets 5.6 --compile-backend aot_eager
                                    (the dry run: every code path, tiny numbers)

A step is what sampling.denoise does once: the conditional and the unconditional transformer call
(6889 image tokens, a 128-token prompt, an 8-token negative prompt), the CFG combine with the norm
rescale, the Euler update. diffusers' step is its transformer called twice plus its pipeline's CFG
arithmetic and scheduler step, on the same weight tensors (random, N(0, 0.02)).

Sections, in the order they run (each prints its lines; a failing section is reported and skipped):
  resident   ours (two calls; one batched call) vs diffusers, eager; the fraction of the card's peak
  fp8        ours with fp8 block weights (fp8.quantize), upcast per layer: memory, time, distance
  budget     weights moved to the CPU, GPU memory capped at each of --budgets GB in turn for the process
             (torch.cuda.set_per_process_memory_fraction): diffusers' block-level group offloading with
             streams vs ours streaming (streaming.py) with batched CFG, bf16 and then fp8 weights; peak
             memory; equality with the resident output
  compiled   regional compilation, ours (mmdit.compile_blocks) vs diffusers (compile_repeated_blocks), last
             because compiling takes the longest (the weights are rebuilt, from the same seed)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_seconds, median_seconds_alternating  # noqa: E402

from qwenimage_minimal import mmdit, sampling, scheduler, streaming, weights  # noqa: E402

BF16_PEAK = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}  # dense TFLOP/s


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def call_flops(config, n_img: int, n_txt: int) -> float:
    """Matrix-product FLOPs of one transformer call: per token and block, q, k, v, out (4 dim²) and the
    MLP (8 dim²) at 2 FLOPs per multiply-add; attention QK^T and PV over the joint sequence."""
    dim, s = config.dim, n_img + n_txt
    per_block = 2 * s * 12 * dim * dim + 4 * s * s * dim
    return config.num_layers * per_block + 2 * n_img * (config.in_channels + 64) * dim


class Setup:
    def __init__(self, a):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.device, self.dtype = (
            torch.device(a.device),
            {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype],
        )
        if self.device.type == "cuda" and self.device.index is None:  # memory calls want an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.size, self.repeats = a.size, a.repeats
        self.config = mmdit.MMDiTConfig(num_layers=a.blocks)
        self.build_models()
        h = w = a.size // 16
        self.shapes = [(1, h, w)]
        g = torch.Generator(device=self.device).manual_seed(1)
        self.x = torch.randn(1, h * w, 64, generator=g, device=self.device, dtype=self.dtype)
        self.cond = (
            torch.randn(1, a.txt_tokens, 3584, generator=g, device=self.device, dtype=self.dtype),
            None,
        )
        self.uncond = (
            torch.randn(1, a.neg_tokens, 3584, generator=g, device=self.device, dtype=self.dtype),
            None,
        )
        sch = scheduler.FlowMatchEulerScheduler()
        sch.set_timesteps(50, h * w, device=self.device)
        self.sigmas = sch.sigmas[:2]  # the first step of the 50-step schedule
        self.ref_sch = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=0.9,
            max_image_seq_len=8192,
            shift_terminal=0.02,
        )
        self.ref_sch.set_timesteps(
            sigmas=np.linspace(1, 1 / 50, 50), mu=scheduler.compute_mu(h * w, sch.config), device=self.device
        )
        self.flops = call_flops(self.config, h * w, a.txt_tokens) + call_flops(
            self.config, h * w, a.neg_tokens
        )

    def build_models(self):
        """diffusers' transformer with random weights on the device (the same ones every time: seeded),
        and ours sharing its tensors."""
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(0)
        with torch.device(self.device):
            self.ref = QwenImageTransformer2DModel(num_layers=self.config.num_layers).to(self.dtype).eval()
        with torch.no_grad():
            for p in self.ref.parameters():
                p.normal_(0, 0.02)
        self.ours = self.new_ours(self.ref.state_dict())

    def new_ours(self, state, quantized=False) -> mmdit.MMDiT:
        model = weights.build_on_meta(lambda: mmdit.MMDiT(self.config))
        if quantized:
            from qwenimage_minimal import fp8

            fp8.quantize(model)
        model.load_state_dict(state, assign=True)
        return model.eval()

    def step_ours(self, model, batch_cfg):
        return lambda: sampling.denoise(
            model,
            self.x,
            self.cond,
            self.sigmas,
            self.shapes,
            negative_prompt=self.uncond,
            cfg_scale=4.0,
            batch_cfg=batch_cfg,
        )

    def step_ref(self, ref):
        def step():
            t = self.ref_sch.timesteps[0]
            sigma = t.expand(1).to(self.dtype) / 1000
            cond = ref(self.x, self.cond[0], None, sigma, [self.shapes], return_dict=False)[0]
            uncond = ref(self.x, self.uncond[0], None, sigma, [self.shapes], return_dict=False)[0]
            comb = uncond + 4.0 * (cond - uncond)
            v = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            self.ref_sch._step_index = 0
            return self.ref_sch.step(v, t, self.x, return_dict=False)[0]

        return step

    def time(self, fns: dict, repeats=None) -> dict:
        return median_seconds_alternating(fns, self.device, repeats or self.repeats, warmup=1)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def gb(n: float) -> float:
    return n / 2**30


def section_resident(s, r):
    ours_sep, ours_batch, ref = s.step_ours(s.ours, False), s.step_ours(s.ours, True), s.step_ref(s.ref)
    with torch.no_grad():
        out_sep, out_batch, out_ref = ours_sep(), ours_batch(), ref()
        t = s.time({"ours": ours_sep, "ours_batched_cfg": ours_batch, "diffusers": ref})
    r["resident_eager"] = {
        "ms_ours": 1e3 * t["ours"],
        "ms_ours_batched_cfg": 1e3 * t["ours_batched_cfg"],
        "ms_diffusers": 1e3 * t["diffusers"],
        "ratio": t["ours"] / t["diffusers"],
        "ratio_batched": t["ours_batched_cfg"] / t["diffusers"],
        "ours_vs_diffusers_max_abs": (out_sep.float() - out_ref.float()).abs().max().item(),
        "batched_vs_two_calls_rel": rel(out_batch, out_sep),
    }
    peak = peak_flops(s.device)
    if peak:
        r["resident_eager"]["fraction_of_peak"] = s.flops / t["ours"] / peak
    s.out_resident, s.out_two_calls = out_batch, out_sep
    print(
        f"resident eager, one CFG step: ours {1e3 * t['ours']:.0f} ms (batched CFG {1e3 * t['ours_batched_cfg']:.0f}"
        f" ms), diffusers {1e3 * t['diffusers']:.0f} ms: ratio {t['ours'] / t['diffusers']:.3f}x "
        f"(batched {t['ours_batched_cfg'] / t['diffusers']:.3f}x); ours vs diffusers max |diff| "
        f"{r['resident_eager']['ours_vs_diffusers_max_abs']:.1e}; batched vs two calls rel "
        f"{r['resident_eager']['batched_vs_two_calls_rel']:.1e}"
        + (f"; {100 * r['resident_eager']['fraction_of_peak']:.0f}% of bf16 peak" if peak else "")
    )


def section_fp8(s, r):
    from qwenimage_minimal import fp8

    model = fp8.quantize(s.new_ours(s.ref.state_dict()))
    bf16_bytes, fp8_bytes = streaming.nbytes(s.ours), streaming.nbytes(model)
    step8, step16 = s.step_ours(model, True), s.step_ours(s.ours, True)
    with torch.no_grad():
        out8 = step8()
        t = s.time({"fp8": step8, "bf16": step16})
        sigma = torch.full((1,), 0.5, device=s.device, dtype=s.dtype)
        call8, call16 = (m(s.x, *s.cond, sigma, s.shapes).float() for m in (model, s.ours))
    # The distance that counts: of the velocity, not of x (x = noise + dt * v moves little in one step).
    dt = (s.sigmas[1] - s.sigmas[0]).item()
    v8, v16 = (out8.float() - s.x.float()) / dt, (s.out_resident.float() - s.x.float()) / dt
    r["fp8"] = {
        "transformer_gb_bf16": gb(bf16_bytes),
        "transformer_gb_fp8": gb(fp8_bytes),
        "ms_fp8": 1e3 * t["fp8"],
        "ms_bf16": 1e3 * t["bf16"],
        "ratio": t["fp8"] / t["bf16"],
        "velocity_rel_err_fp8_vs_bf16": ((v8 - v16).norm() / v16.norm()).item(),
        "one_call_rel_err_fp8_vs_bf16": ((call8 - call16).norm() / call16.norm()).item(),
    }
    print(
        f"fp8 weights: transformer {gb(fp8_bytes):.1f} GB vs {gb(bf16_bytes):.1f} GB bf16; step {1e3 * t['fp8']:.0f}"
        f" ms vs {1e3 * t['bf16']:.0f} ms ({t['fp8'] / t['bf16']:.2f}x); velocity relative L2 distance from bf16 "
        f"{r['fp8']['velocity_rel_err_fp8_vs_bf16']:.2e} after CFG (x4 amplifies differences), "
        f"{r['fp8']['one_call_rel_err_fp8_vs_bf16']:.2e} for one transformer call at sigma 0.5"
    )
    s.out_fp8 = out8
    del model
    gc.collect()
    torch.cuda.empty_cache() if s.device.type == "cuda" else None


def section_compiled(s, r, backend):
    """Regional compilation, both CFG passes as two calls as diffusers makes them (two shapes to compile)."""
    if s.ref is None:  # the budget section moved the weights off the device
        s.build_models()
    compiled = s.new_ours(s.ref.state_dict())
    mmdit.compile_blocks(compiled, backend=backend)
    ours_c = s.step_ours(compiled, False)
    with torch.no_grad():
        t0 = time.perf_counter()
        out_c = ours_c()
        torch.cuda.synchronize() if s.device.type == "cuda" else None
        compile_ours = time.perf_counter() - t0
        s.ref.compile_repeated_blocks(fullgraph=True, backend=backend)
        ref_c = s.step_ref(s.ref)
        t0 = time.perf_counter()
        out_ref_c = ref_c()
        torch.cuda.synchronize() if s.device.type == "cuda" else None
        compile_ref = time.perf_counter() - t0
        t = s.time({"ours_compiled": ours_c, "diffusers_compiled": ref_c})
    eager = r.get("resident_eager", {})
    r["compiled"] = {
        "ms_ours": 1e3 * t["ours_compiled"],
        "ms_diffusers": 1e3 * t["diffusers_compiled"],
        "ratio_vs_diffusers_compiled": t["ours_compiled"] / t["diffusers_compiled"],
        "first_call_s_ours": compile_ours,
        "first_call_s_diffusers": compile_ref,
        "ours_vs_diffusers_compiled_max_abs": (out_c.float() - out_ref_c.float()).abs().max().item(),
    }
    if "ms_diffusers" in eager:
        r["compiled"]["ratio_vs_diffusers_eager"] = t["ours_compiled"] / (eager["ms_diffusers"] / 1e3)
        r["compiled"]["ratio_vs_ours_eager"] = t["ours_compiled"] / (eager["ms_ours"] / 1e3)
        r["compiled"]["compiled_vs_eager_rel"] = rel(out_c, s.out_two_calls)
    peak = peak_flops(s.device)
    if peak:
        r["compiled"]["fraction_of_peak"] = s.flops / t["ours_compiled"] / peak
    print(f"compiled (regional), one CFG step as two calls: {r['compiled']}", flush=True)
    del compiled


def section_budget(s, r, budgets, stream_repeats):
    """Everything on the CPU, the GPU capped at each budget in turn: diffusers' group offloading, then ours
    (bf16 streamed, then fp8 weights, which need a quarter of the streaming or none)."""
    from diffusers import QwenImageTransformer2DModel

    cuda = s.device.type == "cuda"
    host = {k: v.to("cpu") for k, v in s.ref.state_dict().items()}  # pageable copies: 41 GB
    s.ref = s.ours = None
    gc.collect()
    total = torch.cuda.get_device_properties(s.device).total_memory if cuda else None
    out = r["budget"] = {}

    def cap(budget_gb):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * 2**30 / total), s.device)
            torch.cuda.reset_peak_memory_stats(s.device)

    def memory() -> dict:
        if not cuda:
            return {}
        free, _ = torch.cuda.mem_get_info(s.device)
        return {
            "peak_allocated_gb": round(gb(torch.cuda.max_memory_allocated(s.device)), 2),
            "peak_reserved_gb": round(gb(torch.cuda.max_memory_reserved(s.device)), 2),
            "device_used_gb": round(gb(total - free), 2),
        }  # + the CUDA context, as nvidia-smi counts

    # diffusers: block-level group offloading, one block per group, prefetching on a CUDA stream.
    if cuda:
        try:
            cap(min(budgets))
            with torch.device("meta"):
                ref = QwenImageTransformer2DModel(num_layers=s.config.num_layers).to(s.dtype).eval()
            ref.load_state_dict(host, assign=True)
            ref.pos_embed = QwenImageTransformer2DModel(
                num_layers=0
            ).pos_embed  # its RoPE tables: not in the state
            t0 = time.perf_counter()
            ref.enable_group_offload(
                s.device,
                torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
            setup = time.perf_counter() - t0
            step = s.step_ref(ref)
            with torch.no_grad():
                got = step()
                t = median_seconds(step, s.device, stream_repeats, warmup=0)
            out["diffusers_group_offload"] = {
                "ms": 1e3 * t,
                "setup_s": round(setup, 1),
                **memory(),
                "rel_to_resident_two_calls": rel(got, s.out_two_calls),
            }
            print(
                f"diffusers group offloading (block level, streams): {out['diffusers_group_offload']}",
                flush=True,
            )
            del ref, step
        except Exception as e:
            traceback.print_exc()
            out["diffusers_group_offload_error"] = f"{type(e).__name__}: {e}"
        gc.collect()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # its pinned copies go back to the OS, not to a cache

    resident_ms = r.get("resident_eager", {}).get("ms_ours_batched_cfg")
    offload_ms = out.get("diffusers_group_offload", {}).get("ms")

    def run(model, label, budget_gb, reference):
        cap(budget_gb)
        t0 = time.perf_counter()
        streamer = streaming.WeightStreamer(model, s.device, int(budget_gb * 2**30))
        with torch.no_grad(), streamer.on_device():
            setup = time.perf_counter() - t0
            batched = s.step_ours(model, True)
            got = batched()
            t = median_seconds(batched, s.device, stream_repeats, warmup=0)
            row = {
                "ms": 1e3 * t,
                "setup_s": round(setup, 1),
                "streamed_blocks": len(streamer.streamed),
                **memory(),
            }
            if label == "bf16" and budget_gb == budgets[0]:
                row["ms_two_calls"] = 1e3 * median_seconds(s.step_ours(model, False), s.device, 1, warmup=0)
        if reference is not None:
            row.update(
                equal_to_resident=bool(torch.equal(got, reference)), rel_to_resident=rel(got, reference)
            )
        if resident_ms:
            row["ratio_vs_resident_bf16"] = 1e3 * t / resident_ms
        if offload_ms:
            row["ratio_vs_diffusers_group_offload"] = 1e3 * t / offload_ms
        out[f"ours_{label}_{budget_gb:g}gb"] = row
        print(f"ours {label} under {budget_gb:g} GB: {row}", flush=True)
        arenas.extend(streamer.pinned)
        model.streamer = None

    def run_each_budget(model, label, reference):
        for budget_gb in budgets:  # a budget that fails (too small, out of memory) is reported
            try:
                run(model, label, budget_gb, reference)
            except Exception as e:
                traceback.print_exc()
                out[f"ours_{label}_{budget_gb:g}gb_error"] = f"{type(e).__name__}: {e}"

    arenas = []
    model = s.new_ours(host)
    del host
    run_each_budget(model, "bf16", s.out_resident)
    if hasattr(s, "out_fp8"):
        # The same weights in fp8, quantised a block at a time on the device (one block fits any budget).
        from qwenimage_minimal import fp8

        cap(max(budgets))
        quantized = nn.ModuleList()
        for block in model.transformer_blocks:
            one = nn.Module()
            one.transformer_blocks = nn.ModuleList([copy.deepcopy(block).to(s.device)])
            quantized.append(fp8.quantize(one).transformer_blocks[0].to("cpu"))
        model8 = s.new_ours(
            {k: v for k, v in model.state_dict().items() if not k.startswith("transformer_blocks.")}
            | {f"transformer_blocks.{k}": v for k, v in quantized.state_dict().items()},
            quantized=True,
        )
        for arena in arenas:  # the bf16 weights' page-locked buffer goes back to the OS
            streaming.unpin(arena)
        del model, quantized
        gc.collect()
        run_each_budget(model8, "fp8", s.out_fp8)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, s.device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--blocks", type=int, default=60)
    p.add_argument("--size", type=int, default=1328)
    p.add_argument("--txt-tokens", type=int, default=128)
    p.add_argument("--neg-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stream-repeats", type=int, default=3)
    p.add_argument("--budgets", default="40,24,16", help="GB, comma-separated, for the budget section")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--sections", default="resident,fp8,budget,compiled")
    p.add_argument("--json")
    a = p.parse_args(argv)
    sections = a.sections.split(",")
    import diffusers

    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    print(
        f"# bench_gpus: {where}, torch {torch.__version__}, diffusers {diffusers.__version__}; {a.blocks} blocks, "
        f"{a.dtype}, {a.size}x{a.size} ({(a.size // 16) ** 2} image tokens), prompt {a.txt_tokens} / negative "
        f"{a.neg_tokens} tokens"
    )
    r = {"device": where, "blocks": a.blocks, "size": a.size, "dtype": a.dtype}
    s = Setup(a)
    plan = [
        ("resident", lambda: section_resident(s, r)),
        ("fp8", lambda: section_fp8(s, r)),
        ("budget", lambda: section_budget(s, r, [float(b) for b in a.budgets.split(",")], a.stream_repeats)),
        ("compiled", lambda: section_compiled(s, r, a.compile_backend)),
    ]
    for name, run in plan:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        try:
            run()
        except Exception as e:  # one failing section must not cost the others' figures
            traceback.print_exc()
            r[f"{name}_error"] = f"{type(e).__name__}: {e}"
        print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()

"""LoRA benchmark: loading and applying a rank-32 all-linear LoRA, and what an unfused LoRA costs per
transformer call, ours vs diffusers + PEFT on the same full-width blocks in the same process.

    python benchmarks/bench_lora.py                 # CPU, fp32, 2 full-width blocks, 256 image + 32 text tokens
    python benchmarks/bench_lora.py --device cuda --dtype bf16 --blocks 4 --img-tokens 4096

1. Load + apply: a kohya-format file (what musubi-tuner writes), rank 32 on every Linear of the
   blocks (14 per block), read from disk and put into the model: ours (lora.read_lora +
   load_adapter) vs diffusers (load_lora_adapter with its format conversion and PEFT injection).
2. Sampling cost: one transformer call without a LoRA, with the LoRA unfused, and fused, both
   implementations; the ratio of unfused to base is what a LoRA costs until it is fused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_seconds_alternating  # noqa: E402

from qwenimage_minimal import lora, mmdit, weights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--img-tokens", type=int, default=256)
    p.add_argument("--txt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from diffusers import QwenImageTransformer2DModel
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)

    with torch.device(device):
        ref = QwenImageTransformer2DModel(num_layers=a.blocks).to(dtype).eval()
    with torch.no_grad():
        for q in ref.parameters():
            q.normal_(0, 0.02)
    ours = weights.build_on_meta(lambda: mmdit.MMDiT(mmdit.MMDiTConfig(num_layers=a.blocks)))
    ours.load_state_dict(
        {k: v.clone() for k, v in ref.state_dict().items()}, assign=True
    )  # own copies: fusing
    # changes the weights
    ours.eval()

    # A rank-32 LoRA on every Linear of the blocks, kohya names, written to disk.
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name in lora.target_names(ours, "all-linear"):
        layer = ours.get_submodule(name)
        flat = "lora_unet_" + name.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = torch.randn(a.rank, layer.in_features, generator=g) * 0.01
        tensors[f"{flat}.lora_up.weight"] = torch.randn(layer.out_features, a.rank, generator=g) * 0.01
        tensors[f"{flat}.alpha"] = torch.tensor(16.0)
    result = {
        "blocks": a.blocks,
        "rank": a.rank,
        "lora_tensors": len(tensors),
        "device": str(device),
        "dtype": a.dtype,
        "lora_mb": sum(t.numel() * 4 for t in tensors.values()) / 2**20,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(tensors, path)

        t0 = time.perf_counter()
        adapters, _ = lora.read_lora(path, ours)
        lora.load_adapter(ours, adapters, "bench")
        result["load_s_ours"] = time.perf_counter() - t0
        from diffusers import QwenImagePipeline

        t0 = time.perf_counter()
        state = QwenImagePipeline.lora_state_dict(str(path))  # reads and converts the kohya names
        ref.load_lora_adapter(state, adapter_name="bench", prefix="transformer")
        result["load_s_diffusers"] = time.perf_counter() - t0

    side = int(a.img_tokens**0.5)
    shape = (1, side, a.img_tokens // side)
    n = shape[1] * shape[2]
    img = torch.randn(1, n, 64, device=device, dtype=dtype)
    txt = torch.randn(1, a.txt_tokens, 3584, device=device, dtype=dtype)
    sigma = torch.tensor([0.5], device=device, dtype=dtype)
    run_ours = lambda: ours(img, txt, None, sigma, [shape])
    run_ref = lambda: ref(img, txt, None, sigma, [[shape]]).sample
    with torch.no_grad():
        err = ((run_ours().float() - run_ref().float()).abs().max() / run_ref().float().abs().max()).item()
        unfused = median_seconds_alternating(
            {"ours": run_ours, "diffusers": run_ref}, device, a.repeats, warmup=1
        )
        lora.fuse(ours)
        ref.fuse_lora(adapter_names=["bench"])
        fused = median_seconds_alternating(
            {"ours": run_ours, "diffusers": run_ref}, device, a.repeats, warmup=1
        )
        lora.unload(ours)
        ref.unload_lora()
        base = median_seconds_alternating(
            {"ours": run_ours, "diffusers": run_ref}, device, a.repeats, warmup=1
        )
    for k in ("ours", "diffusers"):
        result |= {
            f"call_ms_base_{k}": 1e3 * base[k],
            f"call_ms_unfused_{k}": 1e3 * unfused[k],
            f"call_ms_fused_{k}": 1e3 * fused[k],
        }
    result |= {
        "unfused_max_rel_err": err,
        "load_ratio": result["load_s_ours"] / result["load_s_diffusers"],
        "unfused_ratio": unfused["ours"] / unfused["diffusers"],
        "fused_ratio": fused["ours"] / fused["diffusers"],
    }

    print(
        f"# LoRA benchmark: {a.blocks} full-width blocks, rank {a.rank} on all {len(tensors) // 3} Linears "
        f"({result['lora_mb']:.0f} MB), {device} {a.dtype}, {n} image + {a.txt_tokens} text tokens"
    )
    print(
        f"load + apply: ours {result['load_s_ours']:.2f} s, diffusers + PEFT {result['load_s_diffusers']:.2f} s "
        f"(ratio {result['load_ratio']:.2f}x)"
    )
    for what in ("base", "unfused", "fused"):
        o, d = result[f"call_ms_{what}_ours"], result[f"call_ms_{what}_diffusers"]
        print(f"transformer call, {what:8s}: ours {o:7.1f} ms, diffusers {d:7.1f} ms, ratio {o / d:.3f}x")
    print(
        f"unfused LoRA costs {result['call_ms_unfused_ours'] / result['call_ms_base_ours']:.2f}x the base call "
        f"(ours); outputs agree to {err:.1e} (max rel)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

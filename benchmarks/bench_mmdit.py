"""MMDiT benchmarks: one full-width block, ours vs diffusers in the same process, and the memory
cost of loading a sharded checkpoint.

    python benchmarks/bench_mmdit.py                       # CPU, fp32: 256 image + 32 text tokens
    python benchmarks/bench_mmdit.py --device cuda --dtype bf16 --img-tokens 4096 --txt-tokens 256

1. Block forward. A diffusers `QwenImageTransformerBlock` at the official width (3072 = 24 x 128)
   with random weights; our `DualStreamBlock` gets the very same tensors. Both run on the same
   inputs, alternately, with the same thread count; we report the median times and their ratio
   (goal: ours <= 1.0x) and check the outputs agree.
2. Load memory. A >= 1 GB checkpoint (full-width blocks, random, sharded) is written once; a fresh
   subprocess then runs `mmdit.load` and reports its peak resident memory above what it held
   before loading, divided by the checkpoint's tensor bytes (goal: <= 1.1x). diffusers'
   `from_pretrained` is measured the same way for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import median_seconds_alternating  # noqa: E402

from qwenimage_minimal import mmdit, weights, writing  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_block(device, dtype, img_tokens, txt_tokens, repeats, warmup):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    config = mmdit.MMDiTConfig(num_layers=1)
    torch.manual_seed(0)
    with torch.device(device):
        ref = QwenImageTransformerBlock(config.dim, config.num_attention_heads, config.attention_head_dim).to(
            dtype
        )
        ours = weights.build_on_meta(lambda: mmdit.DualStreamBlock(config))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)  # the same tensors, shared
    ours.eval(), ref.eval()

    side = int(img_tokens**0.5)
    shape = (1, side, img_tokens // side)
    n = shape[1] * shape[2]
    g = torch.Generator(device=device).manual_seed(1)
    img = torch.randn(1, n, config.dim, generator=g, device=device, dtype=dtype)
    txt = torch.randn(1, txt_tokens, config.dim, generator=g, device=device, dtype=dtype)
    temb = torch.randn(1, config.dim, generator=g, device=device, dtype=dtype)
    img_rope, txt_rope = mmdit.rope_tables([shape], txt_tokens, config, device=device)

    run_ours = lambda: ours(img, txt, temb, img_rope, txt_rope)[0]
    run_ref = lambda: ref(img, txt, None, temb, (img_rope, txt_rope))[1]
    with torch.no_grad():
        out_ours, out_ref = run_ours(), run_ref()
        err = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()
        med = median_seconds_alternating({"ours": run_ours, "diffusers": run_ref}, device, repeats, warmup)
    return {
        "block_ms_ours": 1e3 * med["ours"],
        "block_ms_diffusers": 1e3 * med["diffusers"],
        "block_ratio": med["ours"] / med["diffusers"],
        "block_max_rel_err": err,
        "img_tokens": n,
        "txt_tokens": txt_tokens,
    }


def write_checkpoint(folder: Path, num_layers: int, shard_bytes: int) -> int:
    """A full-width random transformer checkpoint in the official layout, written tensor by tensor."""
    import weights_convert

    config = mmdit.MMDiTConfig(num_layers=num_layers)
    model = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    single = folder.parent / "single.safetensors"
    entries = [(k, tuple(v.shape), torch.float32) for k, v in model.state_dict().items()]
    g = torch.Generator().manual_seed(0)
    writing.write_safetensors(single, entries, (torch.randn(s, generator=g) * 0.02 for _, s, _ in entries))
    weights_convert.convert(single, folder, max_shard_size=shard_bytes, log=lambda *a: None)
    single.unlink()
    return sum(torch.Size(s).numel() * 4 for _, s, _ in entries)


LOAD_SNIPPET = r"""
import resource, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[3])
def rss_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
which, folder = sys.argv[1], sys.argv[2]
if which == "ours":
    from qwenimage_minimal import mmdit
    load = lambda: mmdit.load(folder)
else:
    from diffusers import QwenImageTransformer2DModel
    load = lambda: QwenImageTransformer2DModel.from_pretrained(folder)
before = rss_kb()
model = load()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
print(before, peak)
"""


def bench_load(num_layers: int, shard_mb: int):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        tensor_bytes = write_checkpoint(folder, num_layers, shard_mb * 2**20)
        n_files = len(list(folder.glob("*.safetensors")))
        result = {"load_checkpoint_gb": tensor_bytes / 1e9, "load_shards": n_files}
        root = str(Path(__file__).resolve().parents[1])
        for which in ("ours", "diffusers"):
            out = subprocess.run(
                [sys.executable, "-c", LOAD_SNIPPET, which, str(folder), root],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            before_kb, peak_kb = int(out[-2]), int(out[-1])
            result[f"load_peak_ratio_{which}"] = (peak_kb - before_kb) * 1024 / tensor_bytes
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--img-tokens", type=int, default=256)
    p.add_argument("--txt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--load-layers",
        type=int,
        default=1,
        help="full-width blocks in the load benchmark (1 block: a 1.6 GB fp32 checkpoint)",
    )
    p.add_argument("--shard-mb", type=int, default=500)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": a.dtype,
    }
    print(
        f"# MMDiT benchmark on {info['device']} ({info['threads']} threads), torch {info['torch']}, {a.dtype}"
    )
    result = {**info, **bench_block(device, DTYPES[a.dtype], a.img_tokens, a.txt_tokens, a.repeats, a.warmup)}
    print(
        f"block forward, {result['img_tokens']} image + {result['txt_tokens']} text tokens: "
        f"ours {result['block_ms_ours']:.1f} ms, diffusers {result['block_ms_diffusers']:.1f} ms, "
        f"ratio {result['block_ratio']:.3f}x (goal <= 1.0), max rel err {result['block_max_rel_err']:.1e}"
    )
    if not a.skip_load:
        result.update(bench_load(a.load_layers, a.shard_mb))
        print(
            f"load {result['load_checkpoint_gb']:.2f} GB in {result['load_shards']} shards: peak RSS above "
            f"baseline / tensor bytes = ours {result['load_peak_ratio_ours']:.3f}x (goal <= 1.1), "
            f"diffusers {result['load_peak_ratio_diffusers']:.3f}x"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""VAE benchmarks: the full-size Qwen-Image VAE, ours vs diffusers in the same process.

    python benchmarks/bench_vae.py                                   # CPU, fp32, 256 and 512 px
    python benchmarks/bench_vae.py --sizes 256 512 1024 --tiled-sizes 512 1024 2048
    python benchmarks/bench_vae.py --device cuda --dtype bf16 --sizes 1024 --tiled-sizes 1024 2048

1. Encode and decode time of one image per size: ours (the single-image 2-D path) vs diffusers
   (causal 3-D convs over zero-padded frames), the same random weights (goal: ours <= 0.5x), and
   their max relative difference.
2. Tiled decode (256 px tiles, 192 px stride) peak memory per output size, each measured in a
   fresh subprocess (CPU: peak RSS above the loaded model; CUDA: torch's peak allocation above the
   loaded model). Goal: flat in resolution (the 1024 px figure within 1.2x of the 512 px one).
   The tiled result's max difference from the untiled decode is reported at the smallest size.
   diffusers' tiled decode is measured too, on CPU only up to --ref-tiled-max px (it is slow).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_seconds as timed  # noqa: E402

from qwenimage_minimal import vae  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_checkpoint(folder: Path):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(
                torch.randn_like(p) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10)
                + (1 if "gamma" in name else 0)
            )
    ref.save_pretrained(folder)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def bench_speed(folder, device, dtype, sizes, repeats):
    from diffusers import AutoencoderKLQwenImage

    ref = AutoencoderKLQwenImage.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    ours = vae.load(folder, device=device, dtype=dtype)
    rows = []
    for size in sizes:
        g = torch.Generator().manual_seed(size)
        x = (torch.rand(1, 3, 1, size, size, generator=g) * 2 - 1).to(device, dtype)
        z = torch.randn(1, 16, 1, size // 8, size // 8, generator=g).to(device, dtype)
        with torch.no_grad():
            err_enc = rel(ours.encode(x).mean, ref.encode(x).latent_dist.mean)
            err_dec = rel(ours.decode(z), ref.decode(z).sample)
            row = {"size": size, "enc_err": err_enc, "dec_err": err_dec}
            for name, fn in [
                ("enc_ours", lambda: ours.encode(x)),
                ("enc_diffusers", lambda: ref.encode(x)),
                ("dec_ours", lambda: ours.decode(z)),
                ("dec_diffusers", lambda: ref.decode(z)),
            ]:
                fn()  # warm-up
                row[name + "_ms"] = 1e3 * timed(fn, device, repeats)
        row["enc_ratio"] = row["enc_ours_ms"] / row["enc_diffusers_ms"]
        row["dec_ratio"] = row["dec_ours_ms"] / row["dec_diffusers_ms"]
        rows.append(row)
        print(
            f"{size:5d} px  encode ours {row['enc_ours_ms']:8.1f} ms  diffusers {row['enc_diffusers_ms']:8.1f} ms  "
            f"ratio {row['enc_ratio']:.2f}x (err {err_enc:.1e}) | decode ours {row['dec_ours_ms']:8.1f} ms  "
            f"diffusers {row['dec_diffusers_ms']:8.1f} ms  ratio {row['dec_ratio']:.2f}x (err {err_dec:.1e})",
            flush=True,
        )
    return rows


PEAK_SNIPPET = r"""
import resource, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
folder, which, size, device, dtype = sys.argv[2], sys.argv[3], int(sys.argv[4]), torch.device(sys.argv[5]), sys.argv[6]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
def rss_kb():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
if which == "ours":
    from qwenimage_minimal import vae
    model = vae.load(folder, device=device, dtype=dtype)
    run = lambda z: model.decode(z, tiled=True)
else:
    from diffusers import AutoencoderKLQwenImage
    model = AutoencoderKLQwenImage.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    model.enable_tiling()
    run = lambda z: model.decode(z).sample
z = torch.randn(1, 16, 1, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss_kb() * 1024
t0 = __import__("time").perf_counter()
with torch.no_grad():
    out = run(z)
if device.type == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(peak, __import__("time").perf_counter() - t0)
"""


def bench_tiled_memory(folder, device, dtype, sizes, ref_max):
    rows = []
    for size in sizes:
        row = {"size": size}
        for which in ("ours", "diffusers"):
            if which == "diffusers" and device.type == "cpu" and size > ref_max:
                continue
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    PEAK_SNIPPET,
                    str(ROOT),
                    str(folder),
                    which,
                    str(size),
                    str(device),
                    dtype,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            row[f"peak_mb_{which}"] = int(out[-2]) / 2**20
            row[f"seconds_{which}"] = float(out[-1])
        rows.append(row)
        ref_part = (
            f", diffusers {row['peak_mb_diffusers']:.0f} MB in {row['seconds_diffusers']:.1f} s"
            if "peak_mb_diffusers" in row
            else ""
        )
        print(
            f"tiled decode {size:5d} px: peak above the loaded model: ours {row['peak_mb_ours']:.0f} MB "
            f"in {row['seconds_ours']:.1f} s{ref_part}",
            flush=True,
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--tiled-sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument(
        "--ref-tiled-max", type=int, default=512, help="largest size for diffusers' tiled decode on CPU"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# VAE benchmark (official config, 127 M params) on {name} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, {a.dtype}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vae"
        make_checkpoint(folder)
        result = {
            "device": name,
            "dtype": a.dtype,
            "speed": bench_speed(folder, device, dtype, a.sizes, a.repeats),
        }
        ours = vae.load(folder, device=device, dtype=dtype)
        size = min(a.tiled_sizes)
        z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(
            device, dtype
        )
        result["tiled_vs_untiled_max_abs"] = (
            (ours.decode(z, tiled=True).float() - ours.decode(z).float()).abs().max().item()
        )
        print(
            f"tiled vs untiled decode at {size} px: max |difference| = {result['tiled_vs_untiled_max_abs']:.3f} "
            "(images in [-1, 1]; the seams are blended, not identical)",
            flush=True,
        )
        del ours
        result["tiled_memory"] = bench_tiled_memory(folder, device, a.dtype, a.tiled_sizes, a.ref_tiled_max)
    mem = {r["size"]: r["peak_mb_ours"] for r in result["tiled_memory"]}
    if 512 in mem and 1024 in mem:
        result["tiled_peak_ratio_1024_vs_512"] = mem[1024] / mem[512]
        print(
            f"tiled decode peak, 1024 px / 512 px = {result['tiled_peak_ratio_1024_vs_512']:.2f}x (goal <= 1.2)"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

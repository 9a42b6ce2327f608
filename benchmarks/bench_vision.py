"""Vision benchmarks (Edit), ours vs transformers in the same process.

    python benchmarks/bench_vision.py                                    # CPU, fp32, 448x448 image
    python benchmarks/bench_vision.py --device cuda --dtype bf16 --height 832 --width 1248 --blocks 4

1. The image processor on one image: ours (numpy + PIL) vs transformers' Qwen2VLImageProcessorPil.
   Outputs must be equal.
2. The vision tower at full width (1280, 16 heads, SwiGLU 3420, merger to 3584) with `--blocks`
   blocks (the last one full attention, the others in 112 px windows), the very same weight tensors
   in both: ours vs transformers' Qwen2_5_VisionTransformerPretrainedModel. Goal: ours <= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from timing import median_seconds as timed  # noqa: E402

from qwenimage_minimal import images, vision, weights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_processor(image, repeats):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    ours = lambda: images.preprocess(image)
    theirs = lambda: ref(images=[image], return_tensors="pt")
    assert torch.equal(ours()[0], theirs()["pixel_values"])
    cpu = torch.device("cpu")
    t_ours, t_ref = timed(ours, cpu, repeats, 1), timed(theirs, cpu, repeats, 1)
    return {"proc_ms_ours": 1e3 * t_ours, "proc_ms_transformers": 1e3 * t_ref, "proc_ratio": t_ours / t_ref}


def bench_tower(image, device, dtype, blocks, repeats, warmup):
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf_config = Qwen2_5_VLVisionConfig(
        depth=blocks,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[blocks - 1],
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        ref = Qwen2_5_VisionTransformerPretrainedModel(hf_config).to(dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    config = vision.VisionConfig(depth=blocks, fullatt_block_indexes=(blocks - 1,))
    ours = weights.build_on_meta(lambda: vision.VisionTower(config))
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)  # the same tensors

    pixels, grid = images.preprocess(image)
    pixels = pixels.to(device)
    grid_t = torch.tensor([grid], device=device)
    with torch.no_grad():
        out_ours = ours(pixels, [grid])
        out_ref = ref(pixels, grid_thw=grid_t).pooler_output
        err = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()
        t_ref, t_ours = [], []
        for _ in range(2):  # alternate to share any drift in machine speed
            t_ref.append(timed(lambda: ref(pixels, grid_thw=grid_t), device, repeats, warmup))
            t_ours.append(timed(lambda: ours(pixels, [grid]), device, repeats, warmup))
    t_ours, t_ref = min(t_ours), min(t_ref)
    _, lengths = vision.window_order([grid], config)
    return {
        "tower_patches": pixels.shape[0],
        "tower_windows": len(lengths),
        "tower_blocks": blocks,
        "tower_ms_ours": 1e3 * t_ours,
        "tower_ms_transformers": 1e3 * t_ref,
        "tower_ratio": t_ours / t_ref,
        "tower_max_rel_err": err,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--height", type=int, default=448)
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from test_vision import random_image

    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# vision benchmark on {name} ({torch.get_num_threads()} threads), torch {torch.__version__}, {a.dtype}"
    )
    image = random_image(a.height, a.width, seed=0)
    result = {"device": name, "dtype": a.dtype, "image": f"{a.width}x{a.height}"}
    result.update(bench_processor(image, a.repeats))
    print(
        f"processor, {a.width}x{a.height}: ours {result['proc_ms_ours']:.1f} ms, transformers "
        f"{result['proc_ms_transformers']:.1f} ms, ratio {result['proc_ratio']:.3f}x (outputs equal)"
    )
    result.update(bench_tower(image, device, DTYPES[a.dtype], a.blocks, a.repeats, a.warmup))
    print(
        f"vision tower (1280, 16 heads, 3420), {a.blocks} blocks, {result['tower_patches']} patches in "
        f"{result['tower_windows']} windows: ours {result['tower_ms_ours']:.1f} ms, transformers "
        f"{result['tower_ms_transformers']:.1f} ms, ratio {result['tower_ratio']:.3f}x (goal <= 1.0), "
        f"max rel err {result['tower_max_rel_err']:.1e}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

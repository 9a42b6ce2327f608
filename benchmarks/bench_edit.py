"""Edit pipeline benchmark: the tiny random Edit-2509 end to end, ours vs diffusers in the same process.

    python benchmarks/bench_edit.py [--steps 4] [--images 2]

The tiny checkpoint is the one `python -m qwenimage_minimal demo --edit` writes (official layout,
real tokenizer vocabulary, vision tower included). Both pipelines get the same input images at the
official areas (1024x1024 for the VAE, so 4096 reference tokens per image plus 4096 noise tokens),
the same prompt embeddings (ours: diffusers 0.42.1 encodes image tokens with other positions, see
the README) and seed, with true CFG; their images are compared. The tiny model makes the fixed
costs (VAE encode of the references, resizing, packing, the loop) visible rather than the MMDiT's
matmuls, which `bench_mmdit.py` covers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from timing import median_seconds as timed  # noqa: E402

from qwenimage_minimal import pipeline, sizes  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()

    root = sizes.write_checkpoint(Path(tempfile.mkdtemp()) / "tiny-edit", "tiny", "QwenImageEditPlusPipeline")
    ours = pipeline.QwenImageEditPipeline.from_pretrained(root)
    ref = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"),
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"),
    )
    ref.set_progress_bar_config(disable=True)

    images = [sizes.test_picture(640, 448), sizes.test_picture(400, 520), sizes.test_picture(512, 512)][
        : a.images
    ]
    embeds, mask = ours.encode_prompt("Paint the house blue", images)
    neg, neg_mask = ours.encode_prompt(" ", images)
    common = dict(
        image=images,
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=4.0,
        num_inference_steps=a.steps,
        output_type="np",
    )
    run_ours = lambda: ours(generator=torch.Generator().manual_seed(0), progress=False, **common).images
    run_ref = lambda: ref(generator=torch.Generator().manual_seed(0), **common).images
    diff = float(np.abs(run_ours() - run_ref()).max())
    cpu = torch.device("cpu")
    t_ref, t_ours = [], []
    for _ in range(2):  # alternate to share any drift in machine speed
        t_ref.append(timed(run_ref, cpu, a.repeats))
        t_ours.append(timed(run_ours, cpu, a.repeats))
    t_ours, t_ref = min(t_ours), min(t_ref)
    tokens = 4096 * (1 + a.images)
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "images": a.images,
        "steps": a.steps,
        "mmdit_tokens": tokens,
        "s_ours": t_ours,
        "s_diffusers": t_ref,
        "ratio": t_ours / t_ref,
        "max_pixel_diff": diff,
    }
    print(f"# Edit-2509 tiny model, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(
        f"{a.images} image(s) at the official areas, {a.steps} steps with true CFG, ~{tokens} image tokens in the "
        f"MMDiT: ours {t_ours:.2f} s, diffusers {t_ref:.2f} s, ratio {t_ours / t_ref:.3f}x; max |pixel diff| {diff:.1e}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

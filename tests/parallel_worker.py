"""Run by tests/test_parallel.py, once in one process and once under torchrun: sample with the layouts given
(tensor parallel x CFG parallel) and write each result's final latents, and each process's block-weight
bytes, to OUT. Also the one-process reference, when run without torchrun (layout 1x1).

    python tests/parallel_worker.py T2I_FOLDER EDIT_FOLDER OUT TPxCFG [TPxCFG ...]      e.g. 2x1 1x2
"""

import json
import os
import sys
from pathlib import Path

import torch

from qwenimage_minimal import distributed, parallel, pipeline, sizes

# Edit-2509's areas shrunk for speed, as tests/test_pipeline_edit.py does (the same in every process)
pipeline.QwenImageEditPlusPipeline.vae_area = 96 * 96
pipeline.QwenImageEditPlusPipeline.condition_area = 56 * 56


def sample(pipe, edit: bool) -> torch.Tensor:
    """Two prompts of different lengths and a negative prompt of a third: padding and masks on every path."""
    common = dict(
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        progress=False,
    )
    if edit:
        picture = sizes.test_picture(96, 64)
        return pipe(image=picture, prompt="make the house red", height=64, width=96, **common).images
    prompts = ["a red square on a grey floor, seen from above", "a cat"]
    return pipe(prompt=prompts, height=48, width=80, **common).images


def main(t2i: str, edit: str, out: str, *layouts: str) -> None:
    out = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    for layout in layouts:
        tp, cfg = (int(v) for v in layout.split("x"))
        for name, root, kind in (
            ("t2i", t2i, pipeline.QwenImagePipeline),
            ("edit", edit, pipeline.QwenImageEditPipeline),
        ):
            pipe = kind.from_pretrained(root, tensor_parallel=tp, cfg_parallel=cfg == 2)
            latents = sample(pipe, name == "edit")
            local, whole = parallel.block_weight_bytes(pipe.transformer)
            tag = f"{name}-tp{tp}-cfg{cfg}"
            (out / f"{tag}-rank{rank}.json").write_text(json.dumps({"local": local, "whole": whole}))
            torch.save(latents, out / f"{tag}-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
    distributed.leave_process_group()

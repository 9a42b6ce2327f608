"""Peak CPU memory per process while full fine-tuning starts on several processes (FSDP2, gloo on the CPU):

    whole   every process loads the whole transformer, then fully_shard keeps its rows (before issue 28)
    meta    built on the meta device, sharded, then filled: each process reads only its rows
            (distributed.load_sharded_transformer, what train.py does now)

    python benchmarks/bench_fsdp_memory.py --write FOLDER [--layers 8 --heads 8]   a random transformer/ folder
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp_memory.py FOLDER whole|meta  one JSON line per process

Peak RSS (ru_maxrss) is measured after the imports and the process group (the baseline) and after the model is
ready; the difference is what loading cost. Its expected value: whole ~ the folder's bytes (plus the shards
kept), meta ~ the bytes / processes.
"""

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch

from qwenimage_minimal import distributed, mmdit, pipeline, writing


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def write(folder: Path, layers: int, heads: int) -> None:
    config = mmdit.MMDiTConfig(
        num_layers=layers, num_attention_heads=heads, attention_head_dim=128, joint_attention_dim=1024
    )
    model = mmdit.MMDiT(config)
    state = model.state_dict()
    header = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    writing.write_folder(
        folder, mmdit.WEIGHTS_STEM, writing.plan_shards(header), state.values(), config.to_json()
    )
    params = sum(t.numel() for t in state.values())
    print(json.dumps({"folder": str(folder), "parameters": params, "bytes": params * 4}))


def measure(folder: Path, mode: str) -> None:
    rank, world, device = distributed.setup_distributed("cpu")
    torch.distributed.barrier()
    baseline = peak_mb()
    if mode == "whole":
        model = pipeline.load_transformer(folder, device="cpu", dtype=torch.float32)
        distributed.shard(model, world, device, torch.float32)
    else:
        model = distributed.load_sharded_transformer(folder, world, device, torch.float32)
    held = sum(p.to_local().numel() * 4 for p in model.parameters())
    row = {
        "mode": mode,
        "rank": rank,
        "world": world,
        "baseline_mb": round(baseline),
        "peak_mb": round(peak_mb()),
        "load_mb": round(peak_mb() - baseline),
        "held_mb": round(held / 2**20),
    }
    # one write per line: the processes share torchrun's stdout, and print's separate "\n" could interleave
    sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("mode", nargs="?", choices=["whole", "meta"])
    p.add_argument("--write", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.write:
        write(a.folder, a.layers, a.heads)
    else:
        measure(a.folder, a.mode)
        distributed.leave_process_group()

"""Several processes under torchrun: the process group, and the model wrapped for it.

    torchrun --nproc_per_node N -m qwenimage_minimal train ...     (RANK, WORLD_SIZE, LOCAL_RANK set)

    LoRA   DDP: every process holds the frozen weights and the same adapters; the adapters' gradients
           are averaged once per optimizer step
    full   FSDP2: each block's weights, gradients and AdamW moments sharded across the processes

One process (no torchrun): the model as it is, and nothing here runs but setup_distributed's first lines.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """Under torchrun (RANK / WORLD_SIZE set): join the process group, gloo on CPU and NCCL on GPUs."""
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        # Rank 0 fills the cache (and gathers full checkpoints) while the others wait at a barrier: allow hours.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6)
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def unwrap(model: nn.Module) -> nn.Module:
    """The transformer inside a DDP wrapper (FSDP2 shards the module in place: it is its own model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_for_processes(transformer: nn.Module, finetune: str, world: int, device, weight_dtype) -> nn.Module:
    """One process: the model itself. Several: DDP for LoRA (every process holds the frozen weights, the
    adapters' gradients are averaged), FSDP2 for full fine-tuning (each block's weights, gradients and
    AdamW moments sharded across processes; fully_shard per block, then the root)."""
    if world == 1:
        return transformer
    if finetune == "lora":
        # static_graph: the same adapters get no gradient at every step (the last block's text-stream output
        # is never used), which DDP must be told about.
        return nn.parallel.DistributedDataParallel(
            transformer, device_ids=[device] if device.type == "cuda" else None, static_graph=True
        )
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=weight_dtype, reduce_dtype=torch.float32)
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    return transformer

"""Several processes under torchrun: the process group, and the model wrapped for it.

    torchrun --nproc_per_node N -m qwenimage_minimal train ...     (RANK, WORLD_SIZE, LOCAL_RANK set)

    LoRA   DDP: every process holds the frozen weights and the same adapters; the adapters' gradients
           are averaged once per optimizer step
    full   FSDP2: each block's weights, gradients and AdamW moments sharded across the processes; the model
           is built on the meta device (no memory), sharded, and only then filled: each process reads from
           the official folder just the rows it holds (load_into_shards), so none ever holds the whole model

One process (no torchrun): the model as it is, and nothing here runs but setup_distributed's first lines.
load_into_shards also fills a tensor-parallel transformer (parallel.py): any model whose parameters are
DTensors, however they were split.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from . import mmdit, weights


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


def leave_process_group() -> None:
    """The end of a run under torchrun (a no-op otherwise). gloo's worker threads let go of a finished
    collective's tensors a moment after the caller has its result, and need the Python interpreter to do so:
    a process that exits in that moment aborts ("terminate called without an active exception", measured
    here in 4 of 10 runs of benchmarks/bench_fsdp_memory.py; pytorch/pytorch#179291). A short sleep hands
    them the GIL first; no barrier, so that a process leaving on an error does not wait for the others."""
    if dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()


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
    if isinstance(transformer, FSDPModule):  # load_sharded_transformer sharded it already
        return transformer
    return shard(transformer, world, device, weight_dtype)


def shard(transformer: nn.Module, world: int, device, weight_dtype) -> nn.Module:
    """FSDP2: fully_shard each block, then the root (the embeddings and the output layer), on a 1-D mesh.
    Each parameter becomes a DTensor split by rows (Shard(0)); a block's weights are gathered just before
    it runs and freed after, its gradients reduce-scattered. Works on meta parameters too."""
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=weight_dtype, reduce_dtype=torch.float32)
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    return transformer


def load_sharded_transformer(path, world: int, device, weight_dtype) -> nn.Module:
    """Full fine-tuning on several processes: the transformer built on the meta device (no memory), sharded by
    FSDP2 (fp32 master weights), then filled from the official folder, each process reading only its rows.
    Peak memory per process: its 1/world of the weights, plus one row block being read."""
    config = mmdit.config_from_folder(path)
    transformer = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    shard(transformer, world, device, weight_dtype)
    return load_into_shards(transformer, path, mmdit.WEIGHTS_STEM, device)


def shard_rows(target: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop): the rows of the whole weight that this process's part of `target` holds, when that part
    is a row block (Shard(0) on a 1-D mesh, torch.chunk's rule: blocks of ceil(rows / n), the last shorter or
    empty); None for any other split (read whole, then sliced)."""
    if not isinstance(target, DTensor) or tuple(target.placements) != (Shard(0),):
        return None
    n, rank = target.device_mesh.size(), target.device_mesh.get_local_rank()
    rows = target.shape[0]  # the whole weight's
    block = -(-rows // n)
    start = min(rank * block, rows)
    stop = min(start + block, rows)
    return (start, stop) if stop - start == target.to_local().shape[0] else None


@torch.no_grad()
def load_into_shards(model: nn.Module, folder, stem: str, device, check_finite: bool = True) -> nn.Module:
    """Fill a model built on the meta device and already split across processes (its parameters DTensors: by
    fully_shard or by tensor parallel's parallelize_module; any others whole) from an official folder, with
    the strict checks of weights.load_weights (names and whole shapes). A row block (FSDP2's shards, tensor
    parallel's column-wise split) is read alone from the file; any other part is sliced from the whole
    tensor by torch's own rule (distribute_tensor, no communication), one tensor at a time."""
    files = weights.weight_files(folder, stem)
    headers = {path: weights.SafetensorsFile(path) for path in sorted(set(files.values()))}
    expected = dict(model.state_dict(keep_vars=True))  # a DTensor's shape is the whole weight's
    mismatched = [
        f"{n}: checkpoint {list(headers[files[n]].shape(n))} vs model {list(t.shape)}"
        for n, t in expected.items()
        if n in files and headers[files[n]].shape(n) != tuple(t.shape)
    ]
    missing = [n for n in expected if n not in files]
    unexpected = [n for n in files if n not in expected]
    if missing or unexpected or mismatched:
        raise weights.CheckpointError(weights.describe_mismatch(folder, missing, unexpected, mismatched))
    model.to_empty(device=device)  # this process's parts, uninitialised
    handles = {path: open(path, "rb") for path in headers}
    bad = None
    try:
        for name, target in model.state_dict(keep_vars=True).items():
            rows = shard_rows(target)
            stored = headers[files[name]].read(name, handles[files[name]], rows=rows)
            if isinstance(target, DTensor) and rows is None:
                stored = distribute_tensor(stored, target.device_mesh, target.placements, src_data_rank=None)
                stored = stored.to_local()
            if check_finite and bad is None and not weights.all_finite(stored):
                bad = name
            (target.to_local() if isinstance(target, DTensor) else target).copy_(stored)
    finally:
        for f in handles.values():
            f.close()
    if check_finite:  # every process learns of a bad weight, so that all stop, not just the one that read it
        found = [bad]
        if dist.is_initialized():
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, bad)
        if any(found):
            raise weights.CheckpointError(
                f"{folder}: tensor {next(b for b in found if b)!r} holds NaN or Inf values; the checkpoint is "
                "damaged (pass check_finite=False to load it anyway)"
            )
    return model.eval()

"""Sampling on several processes: tensor parallel and CFG parallel, on a device mesh (torch.distributed only).

    torchrun --nproc_per_node 4 -m qwenimage_minimal generate ... --tensor-parallel 2 --cfg-parallel

    mesh (cfg, tp) = (2, 2)        ranks [[0, 1],      row 0 runs the conditional pass,
                                          [2, 3]]      row 1 the unconditional; each row splits the blocks

Tensor parallel (Megatron's split, with torch.distributed.tensor.parallel): in every block the Linears that
fan out are split by output features (column-wise: to_q/k/v, add_q/k/v_proj, the MLPs' first Linear) and
the Linears that fan in by input features (row-wise: to_out.0, to_add_out, the MLPs' second Linear). A
column-wise Linear's output is this process's slice of the features, and nothing is exchanged until the
row-wise Linear, whose partial sums are added across the processes (one all-reduce). Between the two:

    x (B, S, 3072) whole ─ to_q (column-wise) ─> (B, S, 3072 / n) = heads / n whole heads of 128
      ─ per-head RMSNorm of q and k, RoPE, attention: all per head, so they run on the local heads as they are
      ─ to_out.0 (row-wise) ─> partial (B, S, 3072), all-reduced ─> whole again

So --tensor-parallel must divide the head count (24: 1, 2, 3, 4, 6, 8, ...), and the attention's reshapes
read the local head count from the tensor (mmdit.JointAttention: unflatten(-1, (-1, head_dim))). The
modulation Linears (img_mod, txt_mod: a third of each block's weights) are split column-wise too and their
small output (B, 6 * 3072) gathered whole, since the chunks (shift, scale, gate, ...) need every feature.
Each process then holds 1/n of every block's weights (the row-wise biases and the q/k norms, a few
thousand numbers per block, are kept whole); the embeddings and the output layer stay whole.

CFG parallel: sampling.denoise's batch_cfg joins the two passes into one batch of 2B; `CFGParallel` gives
each row of the mesh its half (the padding the join added removed, so each half is exactly the call one
process would make) and gathers the two velocities back. Every process then takes the same Euler step on the
same latents: nothing else changes.

The transformer is built on the meta device, split, and filled from the folder by
distributed.load_into_shards: each process reads the rows it holds, never the whole model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from . import distributed, mmdit, weights

# Per block: module path -> how it is split. Column-wise outputs stay local (this process's features);
# row-wise outputs come back whole (all-reduced); the modulation's output is gathered whole.
BLOCK_PLAN = {
    **{
        f"attn.{name}": "column"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    },
    "attn.to_out.0": "row",
    "attn.to_add_out": "row",
    **{f"{stream}_mlp.net.0.proj": "column" for stream in ("img", "txt")},
    **{f"{stream}_mlp.net.2": "row" for stream in ("img", "txt")},
    "img_mod.1": "gathered",
    "txt_mod.1": "gathered",
}


def check_layout(tensor_parallel, cfg_parallel, heads: int) -> None:
    """The split asked for, against the model, before any process group exists."""
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise ValueError(
            f"tensor_parallel (--tensor-parallel) must be an integer >= 1, got {tensor_parallel!r}"
        )
    if heads % tensor_parallel:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"tensor_parallel (--tensor-parallel) {tensor_parallel} must divide the transformer's {heads} "
            f"attention heads (each process computes whole heads): use one of {divisors}"
        )
    if not isinstance(cfg_parallel, bool):
        raise ValueError(f"cfg_parallel (--cfg-parallel) must be True or False, got {cfg_parallel!r}")


def make_mesh(tensor_parallel: int, cfg_parallel: bool, device) -> tuple[DeviceMesh, torch.device]:
    """Join the process group (under torchrun) and lay the processes out as (cfg, tp). -> (mesh, this
    process's device: cuda:LOCAL_RANK on GPUs)."""
    cfg = 2 if cfg_parallel else 1
    _, world, device = distributed.setup_distributed(None if device is None else str(device))
    if world != cfg * tensor_parallel:
        raise ValueError(
            f"the number of processes ({world}, torchrun's --nproc_per_node x --nnodes) must equal "
            f"cfg_parallel (--cfg-parallel: {cfg}) x tensor_parallel (--tensor-parallel: {tensor_parallel}) "
            f"= {cfg * tensor_parallel}"
        )
    return init_device_mesh(device.type, (cfg, tensor_parallel), mesh_dim_names=("cfg", "tp")), device


def tensor_parallelize(model: mmdit.MMDiT, tp_mesh: DeviceMesh) -> mmdit.MMDiT:
    """Split every block's Linears across `tp_mesh` (BLOCK_PLAN), in place; meta weights stay meta."""
    styles = {
        "column": lambda: ColwiseParallel(),
        "row": lambda: RowwiseParallel(),
        "gathered": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    for block in model.transformer_blocks:
        parallelize_module(block, tp_mesh, {path: styles[kind]() for path, kind in BLOCK_PLAN.items()})
    return model


def load_transformer(path, mesh: DeviceMesh, device, dtype=None, check_finite: bool = True) -> mmdit.MMDiT:
    """An official transformer/ folder, its blocks split across the mesh's "tp" dimension: built on the meta
    device, split, then filled, each process reading its part (distributed.load_into_shards)."""
    config = mmdit.config_from_folder(path)
    files = weights.weight_files(path, mmdit.WEIGHTS_STEM)
    if dtype is None:  # the files' own dtype, as mmdit.load keeps it
        first = next(iter(files))
        dtype = weights.SafetensorsFile(files[first]).dtype(first)
    model = weights.build_on_meta(lambda: mmdit.MMDiT(config)).to(dtype)
    tensor_parallelize(model, mesh["tp"])
    return distributed.load_into_shards(model, path, mmdit.WEIGHTS_STEM, device, check_finite)


def unpad(embeds: torch.Tensor, mask: torch.Tensor | None):
    """(B, L, D) embeddings and their mask after sampling.join_prompts padded them to the other prompt's length
    -> the same without the trailing columns no prompt of the batch uses (and no mask when none is padded)."""
    if mask is None:
        return embeds, None
    length = int(mask.sum(1).max())
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if bool(mask.all()) else mask)


class CFGParallel(nn.Module):
    """The transformer as sampling.denoise(batch_cfg=True) calls it, with the batch of 2B ([conditional |
    unconditional]) split across the mesh's "cfg" dimension: each process runs its half, and the two halves'
    velocities are gathered back into one (2B, N, C) on every process."""

    def __init__(self, model: nn.Module, cfg_mesh: DeviceMesh):
        super().__init__()
        self.model, self.mesh = model, cfg_mesh

    def forward(self, tokens, embeds, mask, sigma, img_shapes):
        # tokens (2B, N, C), embeds (2B, L, D), mask (2B, L) or None, sigma (2B,)
        half = tokens.shape[0] // 2
        mine = slice(self.mesh.get_local_rank() * half, (self.mesh.get_local_rank() + 1) * half)
        embeds, mask = unpad(embeds[mine], None if mask is None else mask[mine])
        v = self.model(tokens[mine], embeds, mask, sigma[mine], img_shapes)  # (B, N, C)
        return DTensor.from_local(v, self.mesh, [Shard(0)]).full_tensor()  # (2B, N, C), halves in rank order


def block_weight_bytes(model: mmdit.MMDiT) -> tuple[int, int]:
    """(bytes of the blocks' weights this process holds, bytes of the whole blocks' weights): 1/n with
    tensor parallel on n processes, up to the few replicated vectors."""
    local = whole = 0
    for p in model.transformer_blocks.parameters():
        part = p.to_local() if isinstance(p, DTensor) else p
        local += part.numel() * part.element_size()
        whole += p.numel() * p.element_size()  # a DTensor's numel is the whole weight's
    return local, whole

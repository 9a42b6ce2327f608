"""Sharded training checkpoints, for full fine-tuning with FSDP2 on several processes: torch.distributed.checkpoint.

    checkpoint-<step>/dcp/          every process writes its own shards of the weights and of the AdamW moments,
                                    all at once (__<rank>_0.distcp), and .metadata says which piece of which tensor
                                    lies where
    checkpoint-<step>/trainer_state.json     the step and the run's identity, as for one process (checkpoints.py)

No process gathers the model to save it: with 20 B fp32 weights and two moments that would be 245 GB in one
place. Loading reshards: a checkpoint written by 2 processes loads on 1, 3 or 64, each process reading the
pieces of the file that overlap its own shards (one process reads the whole tensors), so a run can continue on
another number of GPUs (with the same number of micro-batches per step: checkpoints.read_checkpoint). The
official-layout transformer/ is gathered once, at the end of the run (whole_weights, checkpoints.finish).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

FOLDER = "dcp"  # inside checkpoint-<step>/


def save(folder: Path, model: nn.Module, optimizer: Optimizer) -> None:
    """Every process: its shards of the weights and of the optimizer's state into `folder` (keys: parameter
    names, as in the one-process checkpoints)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)


def load(folder: Path, model: nn.Module, optimizer: Optimizer) -> None:
    """Every process: the weights and AdamW moments of a checkpoint written by any number of processes, into
    this run's shards (or whole tensors, in one process). The optimizer's hyperparameters stay this run's."""
    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer)  # AdamW's state made (zeros) for every weight
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata  # flattened keys
    # A weight that never had a gradient (the last block's text stream feeds nothing) has no state in the
    # checkpoint, and must have none here either, as in the run that wrote it.
    moments = {n: s for n, s in optim_state["state"].items() if f"optim.state.{n}.step" in saved}
    state = {"model": model_state, "optim": {"state": moments}}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(  # strict=False: the weights left without state above
        model,
        optimizer,
        {"state": state["optim"]["state"], "param_groups": optim_state["param_groups"]},
        options=StateDictOptions(strict=False),
    )
    for name, p in model.named_parameters():
        if name not in moments:
            optimizer.state.pop(p, None)


def whole_weights(model: nn.Module) -> dict:
    """Every process takes part; the main process gets {name: whole fp32 tensor on the CPU}, the others {}."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach() for k, v in get_model_state_dict(model, options=options).items()}

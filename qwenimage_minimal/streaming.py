"""Streamed transformer weights: the 41 GB MMDiT on a GPU with less memory than that.

Qwen-Image's MMDiT is 60 blocks of the same shape, ~680 MB each in bf16. Under a memory budget
we keep as many blocks on the GPU as fit ("resident") and stream the others from pinned CPU
memory at every call. A streamed block runs in a *slot*: a spare block of the same shape on the
GPU whose weights are overwritten with the next streamed block's while other blocks compute.
Copies go on a side CUDA stream, so the copy engine and the compute units work at the same time:

    copy stream     [b1 -> slot 0] [b3 -> slot 1]        [b5 -> slot 0]        [b7 -> slot 1]
    compute stream   b0   wait  b1 (slot 0)   b2   b3 (slot 1)   b4   b5 (slot 0)   b6  ...
                                            \\__ slot 0 is free once b1 has run: b5 is copied in

Two CUDA events per slot order the streams: `copied` (compute waits until the weights are in) and
`computed` (the next copy into the slot waits until the block that used it has run). Streamed
blocks are spread evenly among the resident ones, so each copy hides behind a resident block's
compute: at 1328x1328 with both CFG passes in one batch a block computes in ~13 ms on an H100 and
its 680 MB of bf16 weights cross PCIe (~54 GB/s from pinned memory) in ~13 ms. The two CFG passes
share one batch (sampling.denoise(batch_cfg=True)): two calls would move every streamed byte twice.
Measured (docs/cuda_check.md): under 24 GB, 31 of 60 blocks streamed, a CFG step takes 1.06x the
resident batched step and 0.5x diffusers' group offloading.

Pinned ("page-locked") host memory matters: only copies from it are asynchronous and reach the
bus's speed. The first time the model goes on the device its CPU weights move into one buffer that
is page-locked where it lies (cudaHostRegister): `Tensor.pin_memory()` would copy each weight into
PyTorch's pinned-memory cache, which rounds every allocation up to a power of two (a 75 MB weight
takes 128 MB there: 60 GB for the 41 GB transformer).

On the CPU there are no streams and no pinning: the same code copies into the slots in order,
which is how the tests check that streamed outputs equal the resident ones bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import weakref

import torch
from torch import nn

SLOTS = 2  # spare blocks on the device: one computing while the next is copied in
ACTIVATION_RESERVE = 4 * 2**30  # bytes kept free for activations (1328x1328, batched CFG: ~2.5 GB; see docs)


def tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers, in a fixed order."""
    return list(itertools.chain(module.parameters(), module.buffers()))


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(module))


def pin_together(cpu_tensors: list[torch.Tensor]) -> torch.Tensor:
    """Move CPU tensors into one buffer and page-lock it where it lies (cudaHostRegister, one call):
    each tensor's data becomes a view of the buffer. -> the buffer (unpin() releases it)."""
    align = lambda n: (n + 63) // 64 * 64
    arena = torch.empty(sum(align(t.numel() * t.element_size()) for t in cpu_tensors), dtype=torch.uint8)
    offset = 0
    for t in cpu_tensors:  # copy, then drop the old memory: the peak is one tensor, not two models
        n = t.numel() * t.element_size()
        view = arena[offset : offset + n].view(t.dtype).view(t.shape)
        view.copy_(t.data)
        t.data = view
        offset += align(n)
    error = int(torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 1))  # 1: portable
    if error:
        raise RuntimeError(
            f"cudaHostRegister of {arena.numel() / 2**30:.1f} GB of weights failed (CUDA error "
            f"{error}): is enough memory lockable (ulimit -l)?"
        )
    return arena


def unpin(arena: torch.Tensor) -> None:
    unpin_address(arena.data_ptr())


def unpin_address(address: int) -> None:
    """Unlock a buffer pin_together locked (its memory may then be freed safely); errors are ignored (at exit
    the CUDA runtime may be gone)."""
    try:
        torch.cuda.cudart().cudaHostUnregister(address)
    except Exception:
        pass


def parse_memory(value) -> int:
    """24, 24.5, "24GB", "24 GiB", "500MB" -> bytes (numbers are GB, as --gpu-memory takes them; 1 GB = 2**30)."""
    units = {"": 2**30, "GB": 2**30, "GIB": 2**30, "G": 2**30, "MB": 2**20, "MIB": 2**20, "M": 2**20}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().upper()
        number_part = text.rstrip("GMIB ")
        unit = text[len(number_part) :].strip()
        try:
            number = float(number_part)
        except ValueError:
            number, unit = -1.0, "?"
    else:
        number, unit = -1.0, "?"
    if unit not in units or not number > 0:
        raise ValueError(
            f"max_gpu_memory must be a positive size such as 24, '24GB' or '16GiB', got {value!r}"
        )
    return int(number * units[unit])


def empty_like_block(block: nn.Module, device) -> nn.Module:
    """A copy of `block`'s structure whose tensors are uninitialised on `device`: a slot. (A plain deepcopy
    would copy the weights, and a weight that is a view of the page-locked buffer drags the whole buffer
    along.) A LoRA layer's saved pre-fusion weight is left out: the slot never unfuses."""
    memo = {}
    for p in block.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
    for b in block.buffers():
        memo[id(b)] = torch.empty_like(b, device=device)
    for m in block.modules():
        if getattr(m, "weight_before_fusing", None) is not None:
            memo[id(m.weight_before_fusing)] = None
    return copy.deepcopy(block, memo)


def spread(n: int, k: int) -> list[int]:
    """k of the positions 0..n-1, evenly spaced (the middle of each of k equal stretches)."""
    return [int((j + 0.5) * n / k) for j in range(k)]


def plan(model: nn.Module, budget: int, reserve: int = ACTIVATION_RESERVE) -> list[int]:
    """The blocks to stream so that the resident weights, the slots and `reserve` fit in `budget` bytes.
    -> sorted block indices ([] when the whole model fits)."""
    blocks = model.transformer_blocks
    block = max(nbytes(b) for b in blocks)
    other = nbytes(model) - sum(nbytes(b) for b in blocks)  # embeddings, output layer: always resident
    if other + len(blocks) * block + reserve <= budget:
        return []
    resident = (budget - reserve - other - SLOTS * block) // block
    if resident < 0:
        need = (other + SLOTS * block + reserve) / 2**30
        raise ValueError(
            f"max_gpu_memory={budget / 2**30:.1f} GB is too small for this transformer: streaming needs "
            f"at least {need:.1f} GB (the non-block weights, {SLOTS} blocks of {block / 2**30:.2f} GB "
            f"and {reserve / 2**30:.1f} GB for activations); give more, or use fp8 weights"
        )
    return spread(len(blocks), len(blocks) - min(resident, len(blocks)))


class WeightStreamer:
    """Runs `model` (an MMDiT) on `device` within `budget` bytes of weights and activations.

        streamer = WeightStreamer(model, "cuda", parse_memory("24GB"))
        with streamer.on_device():        # resident weights in, streamed blocks stay pinned on the CPU
            v = model(...)                # MMDiT.forward runs its blocks from streamer.blocks()

    Outside `on_device` the whole model stays on the CPU, where the weights' master copies live
    (changes to them, e.g. a fused LoRA, are picked up at the next `on_device`)."""

    def __init__(self, model: nn.Module, device, budget: int, reserve: int = ACTIVATION_RESERVE):
        self.model, self.device, self.budget, self.reserve = model, torch.device(device), budget, reserve
        self.streamed = plan(model, budget, reserve)  # checks the budget now, at the public boundary
        self.cuda = self.device.type == "cuda"
        self.slots: list[nn.Module] = []
        self.compile_options = (
            None  # set by mmdit.compile_blocks: the slots are then compiled like the blocks
        )
        self.pinned: list[torch.Tensor] = []  # page-locked buffers holding the CPU copies of the weights
        model.streamer = self

    # --- placing the weights ---------------------------------------------------------------------

    @contextlib.contextmanager
    def on_device(self):
        """Resident weights on the device and two slots ready for the whole `with`; all back after."""
        self.streamed = plan(self.model, self.budget, self.reserve)  # again: adapters may have been added
        blocks = self.model.transformer_blocks
        streamed_tensors = {id(t) for i in self.streamed for t in tensors(blocks[i])}
        if self.cuda:  # pin once; tensors added since (e.g. LoRA adapters) are pinned then
            loose = [t for t in tensors(self.model) if t.device.type == "cpu" and not t.data.is_pinned()]
            if loose:
                arena = pin_together(loose)
                self.pinned.append(arena)
                weakref.finalize(self, unpin_address, arena.data_ptr())  # unlocked when the streamer goes
        host = {}
        for t in tensors(self.model):
            if id(t) not in streamed_tensors:
                host[t] = t.data
                t.data = t.data.to(self.device, non_blocking=True)
        try:
            self.make_slots()
            yield self
        finally:
            try:
                if self.cuda:
                    torch.cuda.synchronize(self.device)  # nothing may still read a slot or a weight we drop
            finally:
                self.slots = []
                for t, data in host.items():
                    t.data = data
                if self.cuda:
                    torch.cuda.empty_cache()

    def make_slots(self) -> None:
        """The spare blocks on the device, and the events and copy stream that schedule them."""
        if not self.streamed:
            return
        blocks = self.model.transformer_blocks
        layout = lambda b: [
            (n, t.shape, t.dtype) for n, t in itertools.chain(b.named_parameters(), b.named_buffers())
        ]
        first = blocks[self.streamed[0]]
        for i in self.streamed:
            if layout(blocks[i]) != layout(first):
                raise ValueError(
                    f"streaming runs every streamed block in a copy of block {self.streamed[0]}, but "
                    f"block {i} holds other tensors (a LoRA on some blocks only?): bake the LoRA "
                    "in first (pipe.fuse_lora(); pipe.unload_lora_weights()), or give more max_gpu_memory"
                )
        self.slots = [empty_like_block(first, self.device) for _ in range(min(SLOTS, len(self.streamed)))]
        if self.compile_options is not None:
            for slot in self.slots:
                slot.compile(fullgraph=True, **self.compile_options)
        self.in_slot = [None] * len(self.slots)  # which block's weights each slot holds
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copy_stream.wait_stream(
                torch.cuda.current_stream(self.device)
            )  # the slots exist before they fill
            self.copied = [torch.cuda.Event() for _ in self.slots]
            self.computed = [torch.cuda.Event() for _ in self.slots]
        for j in range(len(self.slots)):  # the first streamed blocks, before the first call
            self.load(self.streamed[j], j)

    # --- the schedule ----------------------------------------------------------------------------

    @torch.no_grad()
    def load(self, i: int, slot: int) -> None:
        """Copy block i's weights into `slot` (on the copy stream, once the slot's last block has run)."""
        if self.in_slot[slot] == i:
            return
        self.in_slot[slot] = None  # half-filled until the loop below is through
        block = self.model.transformer_blocks[i]
        with torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext():
            if self.cuda:
                self.copy_stream.wait_event(self.computed[slot])
            for dst, src in zip(tensors(self.slots[slot]), tensors(block)):
                dst.copy_(src, non_blocking=True)
            if self.cuda:
                self.copied[slot].record(self.copy_stream)
        for dst, src in zip(self.slots[slot].modules(), block.modules()):
            if hasattr(src, "scaling"):  # a LoRA layer: its alpha / r and scales are not tensors
                dst.scaling, dst.scale, dst.fused = dict(src.scaling), dict(src.scale), set(src.fused)
        self.in_slot[slot] = i

    def blocks(self):
        """The model's blocks in order, each on the device when its turn comes: MMDiT.forward runs these.
        A streamed block is yielded as its slot; after it has been queued, the slot is refilled with the
        streamed block two further on (wrapping round to the first ones, for the next call)."""
        if not self.slots:  # nothing streamed, or outside on_device
            yield from self.model.transformer_blocks
            return
        order = {block: j for j, block in enumerate(self.streamed)}
        for i, block in enumerate(self.model.transformer_blocks):
            if i not in order:
                yield block
                continue
            j = order[i]
            slot = j % len(self.slots)
            self.load(i, slot)  # already there, unless a call was interrupted
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
            yield self.slots[slot]
            if self.cuda:
                self.computed[slot].record(torch.cuda.current_stream(self.device))
            self.load(self.streamed[(j + len(self.slots)) % len(self.streamed)], slot)

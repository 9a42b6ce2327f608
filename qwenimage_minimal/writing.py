"""Writing files so that nothing is lost: every file is written under a temporary name, flushed and renamed
over its final name (`atomic_write`), so a crash or a full disk leaves the old file or none, never a
half-written one that loads; errors of the disk become one sentence (`output_errors`, `OutputError`).

    write_safetensors   a safetensors file, streamed: the header first, then one tensor at a time
    write_folder        the official folder layout: one file, or shards (`plan_shards`) + index, and config.json;
                        the converter, training checkpoints and sizes.write_checkpoint all write through it
    write_json          a config or an index

weights.py reads what this file writes."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .weights import TORCH_TO_SAFETENSORS


class OutputError(OSError):
    """A file or folder that cannot be written (disk full, read-only, not a folder); nothing was changed."""

    def __str__(self):
        return self.strerror


def check_writable_folder(folder, what: str, create: bool = True) -> None:
    """The folder exists (else the nearest existing ancestor), is a folder, and can be written;
    with `create`, missing folders are made."""
    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise OutputError(errno.ENOTDIR, f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"{what}: {existing} is read-only (no permission to write there)")
    if existing != folder and create:
        with output_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def output_errors(path):
    """Turn the OS errors of writing `path` into one OutputError sentence."""
    try:
        yield
    except OSError as e:  # an inner OutputError is named again after the outer (final) path
        reason = {
            errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
        }.get(e.errno)
        if reason is None:
            if isinstance(e, OutputError):
                raise
            reason = e.strerror or str(e)
        raise OutputError(
            e.errno, f"cannot write {path}: {reason}; the previous output (if any) is unchanged"
        ) from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; when the block ends without an error, flush
    it to disk and rename it over `path` (a rename within a folder is atomic). On an error or a
    crash the destination keeps its previous content, or stays absent. Clear errors for a full
    disk, a read-only place and a parent that is not a folder."""
    path = Path(path)
    check_writable_folder(path.parent, f"cannot write {path}")
    with output_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # the permissions a plain open() would give
        with output_errors(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path, data) -> None:
    """A JSON file (config.json, an index), written atomically."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(data, indent=2))


def write_safetensors(
    path: str | os.PathLike,
    names_shapes_dtypes: list[tuple[str, tuple, torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict | None = None,
) -> int:
    """Write a safetensors file *streaming*: the header first (from names, shapes and dtypes), then
    each tensor's bytes as the iterable yields them, so only one tensor is in memory at a time.
    Returns the number of bytes of tensor data written."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in names_shapes_dtypes:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to a multiple of 8 bytes
    with atomic_write(path) as f:  # a crash never leaves a half-written file under the final name
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), t in zip(names_shapes_dtypes, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(
                    f"tensor {name!r}: got {tuple(t.shape)} {t.dtype}, header says {shape} {dtype}"
                )
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


def plan_shards(header: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int = 5 * 2**30) -> list[list]:
    """Cut a header [(name, shape, dtype)] into consecutive shards of at most `max_shard_bytes` of tensor data
    each (a tensor larger than that gets a shard of its own), as diffusers' save_pretrained cuts them."""
    shards, current, current_bytes = [], [], 0
    for entry in header:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += nbytes
    return shards + [current]


def write_folder(
    folder,
    stem: str,
    shards: list[list[tuple[str, tuple, torch.dtype]]],
    tensors: Iterable[torch.Tensor],
    config: dict | None = None,
) -> list[Path]:
    """A component folder in the official layout, streaming: one shard -> `<stem>.safetensors`; several ->
    `<stem>-0000i-of-0000n.safetensors` + `<stem>.safetensors.index.json`; then config.json (if given).

    shards   the header cut into files, [[(name, shape, dtype)], ...]: plan_shards(header, max_shard_bytes),
             or explicit groups (the Edit text encoder keeps its vision tower in a shard of its own)
    tensors  every tensor, in the order of the shards' entries; read one at a time, so a converter holds
             one tensor in memory, not the model
    returns  the files written: the weights, the index (if sharded), config.json (if given)

    The index is diffusers' and transformers': {"metadata": {"total_size": bytes}, "weight_map": {name: file}}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = iter(tensors)
    weight_map, total_size = {}, 0
    for shard, name in zip(shards, names):
        total_size += write_safetensors(folder / name, shard, itertools.islice(stream, len(shard)))
        weight_map.update({entry[0]: name for entry in shard})
    if next(stream, None) is not None:
        raise ValueError(f"{folder}: more tensors than the {len(weight_map)} the shards name")
    files = [folder / name for name in names]
    if len(shards) > 1:
        files.append(folder / f"{stem}.safetensors.index.json")
        write_json(files[-1], {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    if config is not None:
        files.append(folder / "config.json")
        write_json(files[-1], config)
    return files

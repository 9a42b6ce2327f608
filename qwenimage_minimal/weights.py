"""Reading and writing the official checkpoint folders: config.json + safetensors, one file or sharded.

Every component (`mmdit`, `vae`, `text_encoder`, ...) loads through `load_weights`, so the rules are
written once:

* Safetensors only. A safetensors file is tiny to describe, so we read it ourselves:

      [8 bytes: little-endian u64 header length n][n bytes: JSON header][raw tensor bytes]

  The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
  counted from the first byte after the header. Reading it by hand lets us check every offset
  (a truncated download is caught before any tensor is used) and read each tensor straight into
  its own buffer: no memory map whose pages pile up in the process, no second copy of the model.
* The model is built on the meta device (shapes, no storage), the checkpoint's names and shapes are
  checked against it *before* a byte of weight is read, and each tensor is then read, cast and
  assigned in place. Peak memory is the model in its final dtype plus one tensor in flight.
* Strict: a missing, unexpected or wrongly shaped tensor is an error that names every offender.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

# The safetensors dtype strings and the torch dtypes they stand for.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

DTYPES_BY_NAME = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# One safetensors file
# ---------------------------------------------------------------------------------------------

class SafetensorsFile:
    """The parsed header of one .safetensors file; `read(name)` reads one tensor from disk.

    All offsets are validated on open, so a truncated or corrupt file fails here, naming the file,
    rather than later as garbage weights.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is truncated or not a safetensors file "
                                      f"({file_size} bytes, no header). Download it again.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > file_size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(f"{self.path} is truncated or not a safetensors file: the header "
                                      f"claims {header_len} bytes but the file has {file_size}. "
                                      "Download it again.")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path} has a corrupt safetensors header ({e}). "
                                      "Download it again.") from None
        self.data_start = 8 + header_len
        data_size = file_size - self.data_start
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {info}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has offsets {begin}..{end} that do not "
                                      f"fit its shape {list(shape)} and dtype {info['dtype']}; the file is corrupt.")
            if end > data_size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the data "
                                      f"but the file holds only {data_size}. Download it again.")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read(self, name: str, file=None) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor (pass an open file handle to avoid reopening)."""
        dtype, shape, begin, end = self.entries[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        own = file is None
        f = open(self.path, "rb") if own else file
        try:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(buffer.numpy()))
        finally:
            if own:
                f.close()
        if got != end - begin:
            raise CheckpointError(f"{self.path}: short read for tensor {name!r}; the file is truncated.")
        return buffer.view(dtype).reshape(shape)


def write_safetensors(path: str | os.PathLike, names_shapes_dtypes: list[tuple[str, tuple, torch.dtype]],
                      tensors: Iterable[torch.Tensor], metadata: dict | None = None) -> int:
    """Write a safetensors file *streaming*: the header first (from names, shapes and dtypes), then
    each tensor's bytes as the iterable yields them, so only one tensor is in memory at a time.
    Returns the number of bytes of tensor data written."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in names_shapes_dtypes:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to a multiple of 8 bytes
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), t in zip(names_shapes_dtypes, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor {name!r}: got {tuple(t.shape)} {t.dtype}, header says {shape} {dtype}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)  # a crash never leaves a half-written file under the final name
    return offset


# ---------------------------------------------------------------------------------------------
# A component folder: config.json + weights
# ---------------------------------------------------------------------------------------------

def read_config(folder: str | os.PathLike, filename: str = "config.json") -> dict:
    path = Path(folder) / filename
    if not path.is_file():
        hint = ""
        if Path(folder).is_dir() and any(Path(folder).glob("*/" + filename)):
            subs = sorted(p.parent.name for p in Path(folder).glob("*/" + filename))
            hint = f" It looks like a model root: pass one of its component folders ({', '.join(subs)})."
        raise CheckpointError(f"{path} not found: expected an official component folder "
                              f"({filename} next to the component's files).{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def config_from_json(config_cls, raw: dict, folder, required: Iterable[str], renames: dict | None = None,
                     must_be_false: Iterable[str] = ()):
    """Build a config dataclass from a config.json dict.

    Fields listed in `required` must be present (they define tensor shapes; a silent default would
    build a model that fails later with a confusing shape error). Flags in `must_be_false` are
    variants this implementation does not support; keys starting with '_' are bookkeeping.
    """
    renames = renames or {}
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{Path(folder) / 'config.json'} is missing required field(s) {missing}.")
    for flag in must_be_false:
        if raw.get(flag):
            raise CheckpointError(f"{Path(folder) / 'config.json'} sets {flag}={raw[flag]!r}: that model variant "
                                  "is not supported by qwenimage-minimal.")
    fields = {f for f in config_cls.__dataclass_fields__}
    kwargs = {}
    for key, value in raw.items():
        key = renames.get(key, key)
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return config_cls(**kwargs)


def weight_files(folder: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Map every tensor name to the file that holds it, for `<stem>.safetensors` or a sharded
    `<stem>.safetensors.index.json` + `<stem>-0000i-of-0000n.safetensors` set."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e!r}); it needs a 'weight_map'.") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard file(s) {missing} listed in {index.name} are missing. "
                                  "Download them (the whole folder) again.")
        return {name: folder / shard for name, shard in weight_map.items()}
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).keys()}
    found = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no {single.name} and no {index.name}"
                          + (f" (found {found})" if found else "")
                          + ". Point at an official component folder, or convert a single-file "
                            "checkpoint with weights_convert.py.")


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating its weights (every parameter on the meta device)."""
    with torch.device("meta"):
        return factory()


def load_weights(model: nn.Module, folder: str | os.PathLike, stem: str, device=None, dtype=None,
                 rename: Callable[[str], str | None] = lambda name: name) -> nn.Module:
    """Fill `model` (built on meta) from the weights in `folder`, strictly, one tensor at a time.

    `rename` maps a checkpoint name to a parameter name, or to None for a tensor that is skipped on
    purpose (e.g. the text encoder's unused lm_head); keep it a small explicit function.
    dtype=None keeps the checkpoint's dtype; floating tensors are cast, integer ones never.
    """
    device = torch.device(device or "cpu")
    files = weight_files(folder, stem)
    headers = {path: SafetensorsFile(path) for path in sorted(set(files.values()))}

    expected = dict(model.state_dict(keep_vars=True))  # parameter and buffer names -> meta tensors
    found: dict[str, tuple[str, Path]] = {}              # model name -> (checkpoint name, file)
    unexpected, mismatched = [], []
    for ckpt_name, path in files.items():
        if ckpt_name not in headers[path].entries:
            raise CheckpointError(f"{path.name} does not hold tensor {ckpt_name!r} although the index says so; "
                                  "the index and shards disagree (mixed downloads?).")
        name = rename(ckpt_name)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(ckpt_name)
            continue
        if name in found:
            raise CheckpointError(f"{folder}: tensors {found[name][0]!r} and {ckpt_name!r} both map to {name!r}.")
        shape = headers[path].shape(ckpt_name)
        if tuple(expected[name].shape) != shape:
            mismatched.append(f"{ckpt_name}: checkpoint {list(shape)} vs model {list(expected[name].shape)}")
        found[name] = (ckpt_name, path)
    missing = [name for name in expected if name not in found]
    if missing or unexpected or mismatched:
        raise CheckpointError(describe_mismatch(folder, missing, unexpected, mismatched))

    handles = {path: open(path, "rb") for path in headers}
    try:
        for name, (ckpt_name, path) in found.items():
            t = headers[path].read(ckpt_name, handles[path])
            target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            t = t.to(device=device, dtype=target)
            _assign(model, name, t)
    finally:
        for f in handles.values():
            f.close()
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter/buffer `name` with `tensor` (no copy)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


def describe_mismatch(folder, missing, unexpected, mismatched, limit: int = 12,
                      problem: str = "do not match the model built from its config.json") -> str:
    def block(title, names):
        if not names:
            return ""
        shown = "\n    ".join(names[:limit])
        more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
        return f"\n  {title} ({len(names)}):\n    {shown}{more}"

    return (f"the weights in {folder} {problem}:"
            + block("missing from the checkpoint", missing)
            + block("unexpected in the checkpoint", unexpected)
            + block("shape mismatch", mismatched)
            + "\nIf config.json was edited, it contradicts the weights; if tensors are missing, the "
              "download is incomplete; unexpected names usually mean a non-diffusers layout "
              "(convert it with weights_convert.py).")


def iter_tensors(files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a name -> file map, one tensor at a time, file by file."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        header = SafetensorsFile(path)
        with open(path, "rb") as f:
            for name in names:
                yield name, header.read(name, f)

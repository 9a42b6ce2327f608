"""Reading the official checkpoint folders: config.json + safetensors, one file or sharded.

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
  Every weight, index and config file read stays inside the component folder, headers and indexes
  are checked for type as well as content, and NaN/Inf weights are reported by name.
* Writing (safetensors streamed, the official folder layout, files that are never half-written) is
  writing.py's job.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import struct
import typing
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

# The safetensors dtype strings and the torch dtypes they stand for.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # stored weights, never a compute dtype (see fp8.py)

DTYPES_BY_NAME = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# The `_class_name`s of model_index.json that this project runs (sizes.py writes them, pipeline/ reads them):
# the official folders' three, and those diffusers' save_pretrained writes for its image-conditioned pipelines
# over the same components (a ControlNet pipeline's folder also holds controlnet/).
PIPELINE_CLASSES = (
    "QwenImagePipeline",
    "QwenImageImg2ImgPipeline",
    "QwenImageInpaintPipeline",
    "QwenImageControlNetPipeline",
    "QwenImageControlNetInpaintPipeline",
    "QwenImageEditPipeline",
    "QwenImageEditInpaintPipeline",
    "QwenImageEditPlusPipeline",
)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is; the message says why and what to do."""


def parse_json(text: str | bytes, what) -> object:
    """json.loads that refuses duplicate keys (which plain json.loads silently resolves to the last)."""

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            repeated = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
            raise CheckpointError(f"{what}: {repeated} appear more than once; the file is corrupt.")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: not valid JSON ({e}).") from None


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
                raise CheckpointError(
                    f"{self.path} is truncated or not a safetensors file "
                    f"({file_size} bytes, no header). Download it again."
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > file_size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(
                    f"{self.path} is truncated or not a safetensors file: the header "
                    f"claims {header_len} bytes but the file has {file_size}. "
                    "Download it again."
                )
            header = parse_json(f.read(header_len), f"{self.path} has a corrupt safetensors header")
        if not isinstance(header, dict):
            raise CheckpointError(
                f"{self.path}: the safetensors header is not a JSON object; the file is corrupt."
            )
        self.data_start = 8 + header_len
        data_size = file_size - self.data_start
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(
                f"{self.path}: __metadata__ must map names to strings; the file is corrupt."
            )
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            ok = (
                isinstance(info, dict)
                and info.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2
                and all(type(v) is int and v >= 0 for v in info["shape"] + info["data_offsets"])
            )
            if not ok:
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {info}")
            dtype, shape, (begin, end) = (
                SAFETENSORS_DTYPES[info["dtype"]],
                tuple(info["shape"]),
                info["data_offsets"],
            )
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has offsets {begin}..{end} that do not "
                    f"fit its shape {list(shape)} and dtype {info['dtype']}; the file is corrupt."
                )
            if end > data_size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the data "
                    f"but the file holds only {data_size}. Download it again."
                )
            self.entries[name] = (dtype, shape, begin, end)
        # Two tensors may not share bytes: each would silently change when the other is read as it.
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.entries.items() if end > begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise CheckpointError(
                    f"{self.path}: tensors {a!r} and {b!r} overlap in the file; it is corrupt."
                )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read(self, name: str, file=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor (pass an open file handle to avoid reopening).
        rows=(start, stop): only those rows of dimension 0, a contiguous stretch of the file (what one
        process holds of a weight split row-wise across processes: distributed.load_into_shards)."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
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


# ---------------------------------------------------------------------------------------------
# A component folder: config.json + weights
# ---------------------------------------------------------------------------------------------


def pipeline_root(path: Path) -> Path | None:
    """The pipeline folder (the one with model_index.json) that `path` is in, or None."""
    return next((p for p in (path, *path.parents) if (p / "model_index.json").is_file()), None)


def linked_to_a_sibling_pipeline(inside: Path, target: Path) -> bool:
    """Whether a link from the component folder `inside` leads into another pipeline folder beside its own
    (two model_index.json folders in one parent): a folder built on another keeps one copy of what they share,
    as checkpoints/nano_edit links to checkpoints/nano's text encoder, tokenizer and VAE."""
    own = pipeline_root(inside)
    if own is None or not target.is_relative_to(own.parent) or target.is_relative_to(own):
        return False
    sibling = (
        own.parent / target.relative_to(own.parent).parts[0]
    )  # the folder beside `own` holding the target
    return sibling.is_dir() and (sibling / "model_index.json").is_file()


def file_in_folder(folder, name: str, what: str = "file") -> Path:
    """folder / name, refused unless it stays inside `folder`: no absolute path, no '..', no symlink
    that leads out. Two exceptions. The Hugging Face cache: there every file of a snapshot is a
    symlink into the `blobs/` folder of the same cached repository (models--org--name/), and that
    is where the official folders are when downloaded with huggingface_hub. And a link into a sibling
    pipeline folder (linked_to_a_sibling_pipeline): the nano Edit model shares the nano model's files."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(
            f"{folder}: the {what} {name!r} is not a plain file name inside the folder; "
            "refusing to read outside the checkpoint"
        )
    folder = Path(folder)
    path = folder / name
    inside = folder.resolve()
    target = path.resolve()
    if target.is_relative_to(inside):
        return path
    cache_repo = next((p for p in inside.parents if p.name.startswith("models--")), None)
    if cache_repo is not None and target.is_relative_to(cache_repo / "blobs"):
        return path
    if linked_to_a_sibling_pipeline(inside, target):
        return path
    raise CheckpointError(
        f"{folder}: the {what} {name!r} is a link to {target}, outside the checkpoint folder; "
        "refusing to read it (copy the file into the folder if it is meant to be there)"
    )


def read_config(folder: str | os.PathLike, filename: str = "config.json") -> dict:
    path = Path(folder) / filename
    if not path.is_file():
        hint = ""
        if Path(folder).is_dir() and any(Path(folder).glob("*/" + filename)):
            subs = sorted(p.parent.name for p in Path(folder).glob("*/" + filename))
            hint = f" It looks like a model root: pass one of its component folders ({', '.join(subs)})."
        raise CheckpointError(
            f"{path} not found: expected an official component folder "
            f"({filename} next to the component's files).{hint}"
        )
    file_in_folder(folder, filename, "config file")
    raw = parse_json(path.read_bytes(), path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got {type(raw).__name__}")
    return raw


def config_from_json(
    config_cls,
    raw: dict,
    folder,
    required: Iterable[str],
    must_be_false: Iterable[str] = (),
    filename: str = "config.json",
):
    """Build a config dataclass from a config.json dict.

    Fields listed in `required` must be present (they define tensor shapes; a silent default would
    build a model that fails later with a confusing shape error). Flags in `must_be_false` are
    variants this implementation does not support; keys starting with '_' are bookkeeping. Every
    value is checked against the field's type (sizes: positive integers), so that a corrupt config
    fails here, naming the field, before anything is built.
    """
    where = Path(folder) / filename
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{where} is missing required field(s) {missing}.")
    for flag in must_be_false:
        if raw.get(flag):
            raise CheckpointError(
                f"{where} sets {flag}={raw[flag]!r}: that model variant "
                "is not supported by qwenimage-minimal."
            )
    types = typing.get_type_hints(config_cls)
    kwargs = {}
    for key, value in raw.items():
        if key in types:
            check_config_value(where, key, value, types[key])
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def check_config_value(where, key: str, value, annotation) -> None:
    """int: a positive integer (not a bool); float: a finite number; bool: a bool; str: a str;
    tuple[X, ...]: a list of those (its integers may be 0: indexes), tuple[X, X, X]: of that length;
    X | None: either."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        fixed_length = Ellipsis not in args
        ok = (
            isinstance(value, (list, tuple))
            and (not fixed_length or len(value) == len(args))
            and all(_plain(v, args[0], minimum=0) for v in value)
        )
    elif args:  # X | None
        ok = value is None or any(_plain(value, a) for a in args if a is not type(None))
    else:
        ok = _plain(value, annotation)
    if not ok:
        expected = getattr(annotation, "__name__", None) or str(annotation)
        raise CheckpointError(
            f"{where}: {key}={value!r} is not a valid {expected} "
            "(sizes are positive integers, factors finite numbers)"
        )


def _plain(value, kind, minimum: int = 1) -> bool:
    if kind is int:
        return type(value) is int and value >= minimum
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    return isinstance(value, kind) if isinstance(kind, type) else True


def weight_files(folder: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Map every tensor name to the file that holds it, for `<stem>.safetensors` or a sharded
    `<stem>.safetensors.index.json` + `<stem>-0000i-of-0000n.safetensors` set. Every shard the
    index names must lie inside the folder (file_in_folder)."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map = parse_json(file_in_folder(folder, index.name, "index").read_bytes(), index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index} is corrupt: it needs a 'weight_map' from tensor names to shard files."
            )
        shards = {shard: file_in_folder(folder, shard, "shard") for shard in sorted(set(weight_map.values()))}
        missing = [s for s, path in shards.items() if not path.is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard file(s) {missing} listed in {index.name} are missing. "
                "Download them (the whole folder) again."
            )
        return {name: shards[shard] for name, shard in weight_map.items()}
    if single.is_file():
        file_in_folder(folder, single.name, "weights file")
        return {name: single for name in SafetensorsFile(single).keys()}
    found = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: no {single.name} and no {index.name}"
        + (f" (found {found})" if found else "")
        + ". Point at an official component folder, or convert a single-file "
        "checkpoint with weights_convert.py."
    )


def count_blocks(names: Iterable[str], prefix: str) -> int:
    """How many numbered blocks `prefix.N.` the names hold (N from 0 up)."""
    found = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", n))}
    return max(found) + 1 if found else 0


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating its weights (every parameter on the meta device)."""
    with torch.device("meta"):
        return factory()


def load_weights(
    build: Callable[[], nn.Module],
    folder: str | os.PathLike,
    stem: str,
    device=None,
    dtype=None,
    rename: Callable[[str], str | None] = lambda name: name,
    block_counts: dict | None = None,
    check_finite: bool = True,
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Build the model on meta with `build()` and fill it from the weights in `folder`, strictly,
    one tensor at a time.

    `rename` maps a checkpoint name to a parameter name, or to None for a tensor that is skipped on
    purpose (e.g. the text encoder's unused lm_head); keep it a small explicit function.
    `block_counts` {prefix: (config field, count)} is compared with the numbered blocks the files
    hold *before* the model is built, so a config that asks for a million layers fails at once.
    dtype=None keeps the checkpoint's dtype; floating tensors are cast, integer ones never. fp8 weights
    need a compute dtype (or fp8.load_transformer, which keeps them in fp8): dtype=None refuses them.
    convert(model name, stored tensor) -> the tensor to assign, replacing the plain cast to `dtype`
    (fp8.load_transformer keeps fp8 weights and dequantises others with it); device placement is its job.
    check_finite: refuse weights holding NaN or Inf, naming the tensor (costs one pass over them).
    """
    device = torch.device(device or "cpu")
    files = weight_files(folder, stem)
    headers = {path: SafetensorsFile(path) for path in sorted(set(files.values()))}
    for ckpt_name, path in files.items():
        if ckpt_name not in headers[path].entries:
            raise CheckpointError(
                f"{path.name} does not hold tensor {ckpt_name!r} although the index says so; "
                "the index and shards disagree (mixed downloads?)."
            )
    renamed = {name: rename(name) for name in files}
    if not any(renamed.values()):
        raise CheckpointError(
            f"the weights in {folder} hold none of this model's tensors (all missing from the "
            f"checkpoint; its {len(files)} tensors belong to something else): is it the right folder?"
        )
    for prefix, (field, count) in (block_counts or {}).items():
        held = count_blocks([n for n in renamed.values() if n is not None], prefix)
        if held != count:
            raise CheckpointError(
                f"{Path(folder) / 'config.json'} says {field}={count} but the weights hold "
                f"{held} {prefix} blocks: the config does not belong to these weights"
            )
    model = build_on_meta(build)

    expected = dict(model.state_dict(keep_vars=True))  # parameter and buffer names -> meta tensors
    found: dict[str, tuple[str, Path]] = {}  # model name -> (checkpoint name, file)
    unexpected, mismatched = [], []
    for ckpt_name, path in files.items():
        name = renamed[ckpt_name]
        if name is None:
            continue
        if name not in expected:
            unexpected.append(ckpt_name)
            continue
        if name in found:
            raise CheckpointError(
                f"{folder}: tensors {found[name][0]!r} and {ckpt_name!r} both map to {name!r}."
            )
        shape, kind = headers[path].shape(ckpt_name), headers[path].dtype(ckpt_name)
        if tuple(expected[name].shape) != shape:
            mismatched.append(f"{ckpt_name}: checkpoint {list(shape)} vs model {list(expected[name].shape)}")
        elif expected[name].is_floating_point() and not kind.is_floating_point:
            mismatched.append(
                f"{ckpt_name}: checkpoint holds {str(kind).replace('torch.', '')} numbers where the "
                "model needs floating-point weights"
            )
        found[name] = (ckpt_name, path)
    missing = [name for name in expected if name not in found]
    if missing or unexpected or mismatched:
        scaled = any(n.endswith(".scale_weight") for n in unexpected)
        hint = (
            "\nIts `scale_weight` tensors make it a scaled-fp8 checkpoint: load it with "
            "qwenimage_minimal.fp8.load_transformer."
            if scaled
            else ""
        )
        raise CheckpointError(describe_mismatch(folder, missing, unexpected, mismatched) + hint)

    handles = {path: open(path, "rb") for path in headers}
    try:
        for name, (ckpt_name, path) in found.items():
            stored = headers[path].read(ckpt_name, handles[path])
            if convert is not None:
                t = convert(name, stored)
            else:
                if dtype is None and stored.dtype in FP8_DTYPES:
                    raise CheckpointError(
                        f"{path}: tensor {ckpt_name!r} is stored in {str(stored.dtype)[6:]}, which "
                        "nothing computes in: pass dtype=torch.bfloat16 (an exact upcast), or for "
                        "the transformer use qwenimage_minimal.fp8.load_transformer, which keeps "
                        "the weights in fp8"
                    )
                target = dtype if (dtype is not None and stored.is_floating_point()) else stored.dtype
                t = stored.to(device=device, dtype=target)
            if check_finite and t.is_floating_point() and not all_finite(t):
                if all_finite(stored):  # finite on disk: the cast overflowed
                    largest = _upcast_fp8(stored).abs().max().item()
                    raise CheckpointError(
                        f"{path}: tensor {ckpt_name!r} has values beyond the range of {t.dtype} "
                        f"(largest |value| {largest:.3g}); load it in bf16 or fp32"
                    )
                bad = int((~torch.isfinite(_upcast_fp8(stored))).sum())
                raise CheckpointError(
                    f"{path}: tensor {ckpt_name!r} holds {bad} NaN or Inf value(s); the "
                    "checkpoint is damaged (pass check_finite=False to load it anyway)"
                )
            _assign(model, name, t)
    finally:
        for f in handles.values():
            f.close()
    return model.eval()


def _upcast_fp8(t: torch.Tensor) -> torch.Tensor:
    """fp8 -> bf16, exactly (every fp8 value is a bf16 value); other tensors unchanged. Many ops
    (isfinite among them) are not implemented for fp8."""
    return t.to(torch.bfloat16) if t.dtype in FP8_DTYPES else t


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor (fp8 included)."""
    return bool(torch.isfinite(_upcast_fp8(t)).all())


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter/buffer `name` with `tensor` (no copy)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


def describe_mismatch(
    folder,
    missing,
    unexpected,
    mismatched,
    limit: int = 12,
    problem: str = "do not match the model built from its config.json",
) -> str:
    def block(title, names):
        if not names:
            return ""
        shown = "\n    ".join(names[:limit])
        more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
        return f"\n  {title} ({len(names)}):\n    {shown}{more}"

    return (
        f"the weights in {folder} {problem}:"
        + block("missing from the checkpoint", missing)
        + block("unexpected in the checkpoint", unexpected)
        + block("shape mismatch", mismatched)
        + "\nIf config.json was edited, it contradicts the weights; if tensors are missing, the "
        "download is incomplete; unexpected names usually mean a non-diffusers layout "
        "(convert it with weights_convert.py)."
    )


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

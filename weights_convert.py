"""Convert Qwen-Image checkpoint files between layouts, streaming, with every tensor accounted for.

    python weights_convert.py SRC DST [--component transformer] [--dtype bf16] [--max-shard-size 5GB]
                                      [--prefix model.diffusion_model.] [--config CONFIG.json] [--overwrite]

What it converts (the direction follows from SRC and DST):

* single file -> official folder: a ComfyUI-style `qwen_image_bf16.safetensors` (the same tensor
  names as diffusers, optionally behind a `model.diffusion_model.` or `diffusion_model.` prefix)
  becomes a `transformer/` folder: config.json (inferred from the tensor shapes) + sharded
  `diffusion_pytorch_model-0000i-of-0000n.safetensors` + index.
* official folder -> single file: the reverse (DST ends in .safetensors); `--prefix` adds a prefix.
* folder -> folder: re-shard and/or cast (`--dtype`).

Rules: tensors are read and written one at a time (peak memory is one tensor, not the model);
an unknown or missing tensor is an error, never a skip; nothing is overwritten without
`--overwrite`; the outputs are re-read at the end and checked against the inputs; a summary is
printed. Safetensors only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qwenimage_minimal import checkpoint as ckpt
from qwenimage_minimal import mmdit


@dataclass
class Component:
    """How one component's tensors are named in the official folder and in single files."""
    name: str
    stem: str                                                # official weight file stem
    prefixes: tuple[str, ...]                                # prefixes single files may carry
    expected: Callable[[dict], dict[str, tuple[int, ...]]]   # config -> official name -> shape
    infer_config: Callable[[dict[str, tuple[int, ...]]], dict]  # official name -> shape  => config.json dict
    to_official: Callable[[str], str] = lambda name: name    # single-file name (prefix stripped) -> official
    from_official: Callable[[str], str] = lambda name: name  # official -> single-file name


def _transformer_expected(config_json: dict) -> dict[str, tuple[int, ...]]:
    config = ckpt.config_from_json(mmdit.MMDiTConfig, config_json, "<config>", mmdit.REQUIRED_FIELDS,
                                   must_be_false=mmdit.UNSUPPORTED_FLAGS)
    model = ckpt.build_on_meta(lambda: mmdit.MMDiT(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _transformer_infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Read the architecture off the tensor shapes (only zero_cond_t cannot be seen in them)."""
    need = ["img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight"]
    absent = [k for k in need if k not in shapes]
    if absent:
        raise ckpt.CheckpointError(f"not a Qwen-Image transformer checkpoint: no {absent}")
    dim, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    if head_dim != 128:
        raise ckpt.CheckpointError(f"attention_head_dim {head_dim} is not the official 128, so the RoPE axes "
                                   "cannot be inferred: pass --config with a config.json")
    config = mmdit.MMDiTConfig(in_channels=in_channels, num_layers=max(blocks) + 1,
                               num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
                               joint_attention_dim=shapes["txt_in.weight"][1],
                               out_channels=shapes["proj_out.weight"][0] // 4)
    return mmdit.config_to_json(config)


COMPONENTS = {
    "transformer": Component("transformer", mmdit.WEIGHTS_STEM, ("model.diffusion_model.", "diffusion_model."),
                             _transformer_expected, _transformer_infer_config),
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def _source_tensors(src: Path, comp: Component, prefix: str | None):
    """Official name -> (file, name in file), for a single file or an official folder."""
    if src.is_dir():
        return {name: (path, name) for name, path in ckpt.weight_files(src, comp.stem).items()}, None
    header = ckpt.SafetensorsFile(src)
    names = header.keys()
    prefixes = [prefix] if prefix is not None else [p for p in comp.prefixes if any(n.startswith(p) for n in names)]
    if len(prefixes) > 1:
        raise ckpt.CheckpointError(f"{src} mixes key prefixes {prefixes}; pass --prefix to choose one")
    used = prefixes[0] if prefixes else ""
    mapping = {}
    for name in names:
        if used and not name.startswith(used):
            raise ckpt.CheckpointError(f"{src}: tensor {name!r} lacks the prefix {used!r} that the others carry")
        official = comp.to_official(name[len(used):])
        if official in mapping:
            raise ckpt.CheckpointError(f"{src}: {mapping[official][1]!r} and {name!r} are the same tensor")
        mapping[official] = (src, name)
    return mapping, used


def convert(src, dst, component: str = "transformer", dtype: torch.dtype | None = None,
            max_shard_size: int = 5 * 2**30, prefix: str | None = None, config_path=None,
            overwrite: bool = False, log=print) -> dict:
    """Convert SRC to DST (see the module docstring). Returns the summary as a dict."""
    src, dst = Path(src), Path(dst)
    comp = COMPONENTS[component]
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    to_file = dst.suffix == ".safetensors"
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve():
        raise ValueError("source and destination are the same path")

    sources, stripped = _source_tensors(src, comp, prefix)
    headers = {path: ckpt.SafetensorsFile(path) for path in {p for p, _ in sources.values()}}
    shapes = {name: headers[p].shape(n) for name, (p, n) in sources.items()}

    # The config: given, read from the source folder, or inferred from the shapes.
    if config_path:
        config_json = json.loads(Path(config_path).read_text())
    elif src.is_dir():
        config_json = ckpt.read_config(src)
    else:
        config_json = comp.infer_config(shapes)

    # Account for every tensor: the source must hold exactly the expected names and shapes.
    expected = comp.expected(config_json)
    unknown = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    wrong = sorted(f"{k}: {list(shapes[k])} vs {list(expected[k])}" for k in set(shapes) & set(expected)
                   if shapes[k] != expected[k])
    if unknown or missing or wrong:
        raise ckpt.CheckpointError(ckpt._describe_mismatch(src, missing, unknown, wrong).replace(
            "do not match the model built from its config.json", f"are not a complete {component} checkpoint"))

    order = list(expected)  # module order, as diffusers writes its shards
    out_dtype = {n: (dtype if dtype is not None and headers[sources[n][0]].dtype(sources[n][1]).is_floating_point
                     else headers[sources[n][0]].dtype(sources[n][1])) for n in order}
    sizes = {n: math.prod(shapes[n]) * out_dtype[n].itemsize for n in order}

    def read(name):
        path, in_name = sources[name]
        return headers[path].read(in_name).to(out_dtype[name])

    if to_file:  # one file, ComfyUI naming
        out_prefix = prefix or ""
        entries = [(out_prefix + comp.from_official(n), shapes[n], out_dtype[n]) for n in order]
        dst.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_safetensors(dst, entries, (read(n) for n in order))
        files = [dst]
    else:        # an official folder, sharded
        shards, current, current_size = [], [], 0
        for n in order:
            if current and current_size + sizes[n] > max_shard_size:
                shards.append(current)
                current, current_size = [], 0
            current.append(n)
            current_size += sizes[n]
        shards.append(current)
        dst.mkdir(parents=True, exist_ok=True)
        for stale in [*dst.glob(f"{comp.stem}*.safetensors"), *dst.glob(f"{comp.stem}*.index.json")]:
            stale.unlink()  # only with --overwrite: old shards must not mix with the new ones
        if len(shards) == 1:
            names = [f"{comp.stem}.safetensors"]
        else:
            names = [f"{comp.stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for shard_names, file_name in zip(shards, names):
            entries = [(n, shapes[n], out_dtype[n]) for n in shard_names]
            ckpt.write_safetensors(dst / file_name, entries, (read(n) for n in shard_names))
            weight_map.update({n: file_name for n in shard_names})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (dst / f"{comp.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (dst / "config.json").write_text(json.dumps(config_json, indent=2))
        files = [dst / f for f in names]

    # Re-read what was written: same names (after renaming), shapes and byte counts as planned.
    written = {}
    for f in files:
        h = ckpt.SafetensorsFile(f)
        for k in h.keys():
            if k in written:
                raise RuntimeError(f"tensor {k} written twice")
            written[k] = (h.shape(k), h.nbytes(k))
    planned = {((prefix or "") + comp.from_official(n) if to_file else n): (shapes[n], sizes[n]) for n in order}
    if written != planned:
        raise RuntimeError("the written files do not hold exactly the planned tensors; output is incomplete")

    summary = {"component": component, "tensors_read": len(sources), "tensors_written": len(written),
               "params": sum(math.prod(s) for s in shapes.values()), "bytes_written": sum(sizes.values()),
               "files": [str(f) for f in files], "dtypes": sorted({str(d).replace("torch.", "") for d in out_dtype.values()}),
               "prefix_stripped": stripped}
    log(f"{component}: {summary['tensors_read']} tensors read from {src}"
        + (f" (prefix {stripped!r} stripped)" if stripped else ""))
    log(f"  {summary['tensors_written']} written to {len(files)} file(s) under {dst}: "
        f"{summary['params'] / 1e9:.2f} B params, {summary['bytes_written'] / 2**30:.2f} GiB, "
        f"dtype {', '.join(summary['dtypes'])}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("src", help="a .safetensors file or an official component folder")
    p.add_argument("dst", help="a component folder, or a .safetensors file for a single-file output")
    p.add_argument("--component", default="transformer", choices=sorted(COMPONENTS))
    p.add_argument("--dtype", choices=sorted(ckpt.DTYPES_BY_NAME), help="cast floating tensors (default: keep)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    p.add_argument("--prefix", help="key prefix of the single file (read: detected by default; write: none)")
    p.add_argument("--config", help="config.json to use instead of inferring it from the tensor shapes")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    a = p.parse_args(argv)
    try:
        convert(a.src, a.dst, a.component, ckpt.DTYPES_BY_NAME.get(a.dtype), a.max_shard_size, a.prefix,
                a.config, a.overwrite)
    except (ckpt.CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

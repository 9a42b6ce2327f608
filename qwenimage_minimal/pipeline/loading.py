"""Loading an official pipeline folder: model_index.json names the class, each component folder loads
with its own file's `load`. The transformer's weight format is chosen here (fp8 or not), above both
mmdit.py and fp8.py, as gpt-fast's generate.py chooses and its model.py never imports quantize.py."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import fp8, mmdit, parallel, scheduler, text_encoder, tokenizer, vae, weights

COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
# pipeline_defaults.json (this project's, optional): the sampling settings a folder's model was made for, named
# as the pipelines' arguments. The official folders have none (the official defaults apply); the nano model,
# trained at 128 px and guided against the empty prompt, carries its own.
DEFAULTS_FILE = "pipeline_defaults.json"
DEFAULT_TYPES = {
    "height": int,
    "width": int,
    "num_inference_steps": int,
    "true_cfg_scale": float,
    "negative_prompt": str,
    # Edit's image areas in pixels (QwenImageEditPipeline's attributes of the same names; the official ~1024² and
    # ~384² are far too large for a model trained at 128 px, so the nano Edit folder states its own)
    "vae_area": int,
    "condition_area": int,
    "output_area": int,
}
AREA_KEYS = ("vae_area", "condition_area", "output_area")


def check_model_folder(root: Path, what: str) -> str:
    """An official pipeline folder: model_index.json and the component folders. -> its _class_name."""
    if not root.is_dir():
        raise weights.CheckpointError(f"model folder {root} does not exist")
    index = root / "model_index.json"
    if not index.is_file():
        raise weights.CheckpointError(
            f"{root} is not a {what} checkpoint: no model_index.json "
            f"(expected {', '.join(COMPONENTS)} folders beside it)"
        )
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise weights.CheckpointError(f"{root}: component folder(s) {missing} missing")
    class_name = weights.parse_json(index.read_bytes(), index)
    class_name = class_name.get("_class_name") if isinstance(class_name, dict) else None
    if class_name not in weights.PIPELINE_CLASSES:
        raise weights.CheckpointError(
            f"{index} names the pipeline class {class_name!r}: not a Qwen-Image checkpoint "
            f"this project runs ({', '.join(weights.PIPELINE_CLASSES)})"
        )
    return class_name


def read_pipeline_defaults(root) -> dict:
    """The folder's pipeline_defaults.json as a dict of checked values ({} when the folder has none)."""
    path = Path(root) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    raw = weights.parse_json(path.read_bytes(), path)
    if not isinstance(raw, dict):
        raise weights.CheckpointError(f"{path}: expected a JSON object of pipeline arguments, got {raw!r}")
    for key, value in raw.items():
        kind = DEFAULT_TYPES.get(key)
        if kind is None:
            raise weights.CheckpointError(f"{path}: unknown key {key!r} (known: {', '.join(DEFAULT_TYPES)})")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = isinstance(value, str) if kind is str else numeric and (kind is float or isinstance(value, int))
        if not ok or (numeric and not (value >= 1 if kind is int else 0 <= value < float("inf"))):
            raise weights.CheckpointError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
    return raw


def load_transformer(path, device=None, dtype=None, check_finite: bool = True) -> torch.nn.Module:
    """A transformer/ folder as it is stored: fp8 weights (weights_convert.py --dtype fp8, or a ComfyUI fp8
    file converted) stay in fp8 and compute in `dtype` (bf16 by default), see fp8.py; any other folder loads
    with mmdit.load. The choice is made here, above both files, as gpt-fast's generate.py chooses and its
    model.py never imports quantize.py."""
    if fp8.is_fp8_folder(path):
        return fp8.load_transformer(
            path, device=device, dtype=dtype or torch.bfloat16, check_finite=check_finite
        )
    return mmdit.load(path, device=device, dtype=dtype, check_finite=check_finite)


def setup_parallel(root: Path, tensor_parallel, cfg_parallel, device, memory_options: bool):
    """from_pretrained's tensor_parallel / cfg_parallel: checked against the transformer's config, then the
    process group joined and the mesh made (parallel.py). -> (mesh or None for one process, device)."""
    if tensor_parallel == 1 and cfg_parallel is False:
        return None, device
    heads = mmdit.config_from_folder(root / "transformer").num_attention_heads
    parallel.check_layout(tensor_parallel, cfg_parallel, heads)
    if memory_options:
        raise ValueError(
            "tensor_parallel / cfg_parallel split the transformer across processes and do not combine with "
            "offload or max_gpu_memory (streaming): drop one of them"
        )
    if fp8.is_fp8_folder(root / "transformer"):
        raise ValueError(
            f"{root / 'transformer'} holds fp8 weights: tensor_parallel splits bf16/fp32 folders"
        )
    return parallel.make_mesh(tensor_parallel, cfg_parallel, device)


def load_components(
    root: Path,
    device,
    dtype,
    offload: bool,
    check_finite: bool = True,
    transformer_weights: bool = True,
    mesh=None,
) -> dict:
    """The five components every Qwen-Image pipeline has, on `device` (on the CPU with offload).
    transformer_weights=False builds the transformer on the meta device (its config, no weights): a
    pipeline that only encodes prompts and images, as the training loop's cache needs. With a mesh
    (setup_parallel) the transformer's blocks are split across its "tp" dimension."""
    place = torch.device("cpu") if offload else device
    options = dict(device=place, dtype=dtype, check_finite=check_finite)
    config = mmdit.config_from_folder(root / "transformer")
    if not transformer_weights:
        transformer = weights.build_on_meta(lambda: mmdit.MMDiT(config))
    elif mesh is not None:
        transformer = parallel.load_transformer(root / "transformer", mesh, **options)
    else:
        transformer = load_transformer(root / "transformer", **options)
    return dict(
        tokenizer=tokenizer.load(root / "tokenizer"),
        text_encoder=text_encoder.load(root / "text_encoder", **options),
        transformer=transformer,
        vae=vae.load(root / "vae", **options),
        scheduler=scheduler.load(root / "scheduler"),
    )

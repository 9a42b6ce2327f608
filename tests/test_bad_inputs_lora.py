"""Issue 30, LoRA / fp8 / converter side: values that used to pass silently into a black picture (NaN or
Inf matrices, integer ones, alpha NaN or <= 0, a scale of 1e30), headers and tensors that used to raise a
traceback, a LoRA on an fp8 transformer blamed on the file, a VAE whose latents_std divides by zero, and
a component folder given to the converter as another. Each asserts the one clear message, and that
nothing was applied or written."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import weights_convert
from qwenimage_minimal import lora, pipeline, sizes, vae, weights

Q = "transformer_blocks.0.attn.to_q"
K = "transformer_blocks.0.attn.to_k"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("bad_lora") / "tiny", "tiny")


@pytest.fixture(scope="module")
def pipe(tiny):
    return pipeline.QwenImagePipeline.from_pretrained(tiny)


def good_tensors(pipe) -> dict:
    """A ComfyUI-layout LoRA (A, B and .alpha per layer) for two attention layers of the tiny model."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in (Q, K):
        layer = pipe.transformer.get_submodule(m)
        tensors[f"diffusion_model.{m}.lora_A.weight"] = 0.1 * torch.randn(4, layer.in_features, generator=g)
        tensors[f"diffusion_model.{m}.lora_B.weight"] = 0.1 * torch.randn(layer.out_features, 4, generator=g)
        tensors[f"diffusion_model.{m}.alpha"] = torch.tensor(4.0)
    return tensors


def with_value(tensors: dict, key: str, index, value) -> dict:
    tensors = dict(tensors)
    t = tensors[key].clone()
    t.view(-1)[index] = value
    tensors[key] = t
    return tensors


BAD_VALUES = {  # name: (change to the good file's tensors, message)
    "NaN in B": (
        lambda t: with_value(t, f"diffusion_model.{K}.lora_B.weight", 3, float("nan")),
        f"the B matrix of {K} holds NaN or Inf",
    ),
    "Inf in A": (
        lambda t: with_value(t, f"diffusion_model.{Q}.lora_A.weight", 0, float("-inf")),
        f"the A matrix of {Q} holds NaN or Inf",
    ),
    "integer B": (
        lambda t: t | {f"diffusion_model.{Q}.lora_B.weight": t[f"diffusion_model.{Q}.lora_B.weight"].long()},
        f"the B matrix of {Q} is int64; LoRA matrices are floating point",
    ),
    "NaN alpha": (
        lambda t: t | {f"diffusion_model.{Q}.alpha": torch.tensor(float("nan"))},
        rf"{Q}.alpha is nan; an alpha is a finite number > 0",
    ),
    "zero alpha": (
        lambda t: t | {f"diffusion_model.{Q}.alpha": torch.tensor(0.0)},
        rf"{Q}.alpha is 0.0; an alpha is a finite number > 0",
    ),
    "negative alpha": (
        lambda t: t | {f"diffusion_model.{K}.alpha": torch.tensor(-4.0)},
        rf"{K}.alpha is -4.0; an alpha is a finite number > 0",
    ),
    "empty alpha": (
        lambda t: t | {f"diffusion_model.{Q}.alpha": torch.zeros(0)},
        rf"{Q}.alpha is a float32 tensor of shape \[0\]; an alpha is one number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_lora_values_are_refused_by_every_reader(case, tiny, pipe, tmp_path, capsys):
    """Before: NaN / Inf / int matrices and NaN or <= 0 alphas were applied (a black picture, exit 0);
    an empty .alpha raised IndexError. Now the pipeline, the converter's --component lora and its
    --merge-lora refuse them, through the same check, naming the file and the layer."""
    damage, message = BAD_VALUES[case]
    bad = tmp_path / "bad.safetensors"
    save_file(damage(good_tensors(pipe)), bad)
    with pytest.raises(weights.CheckpointError, match=message):
        pipe.load_lora_weights(bad)
    assert not lora.lora_layers(pipe.transformer)
    for args in (
        [str(bad), str(tmp_path / "out.safetensors"), "--component", "lora"],
        [str(tiny / "transformer"), str(tmp_path / "merged"), "--merge-lora", str(bad)],
    ):
        assert weights_convert.main(args) == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged").exists()


def test_the_converter_refuses_a_merge_scale_out_of_range(tiny, pipe, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_file(good_tensors(pipe), good)
    merge = [str(tiny / "transformer"), str(tmp_path / "m"), "--merge-lora", f"{good}:1e30"]
    assert weights_convert.main(merge) == 2
    assert "SCALE of FILE:SCALE must be a finite number between -100 and 100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--merge-lora scale must be a finite number between -100 and 100"):
        weights_convert.convert(tiny / "transformer", tmp_path / "m", merge_lora=[(good, -1e3)])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "header, message",
    [
        ("{not json", "lora_adapter_metadata in the header: not valid JSON"),
        ("[4, 4]", "lora_adapter_metadata in the header is a JSON list, not the object"),
        ('{"transformer.lora_alpha": "big"}', "the header's transformer.lora_alpha is 'big'; an alpha is"),
        ('{"transformer.lora_alpha": 0}', "the header's transformer.lora_alpha is 0; an alpha is"),
        ('{"transformer.alpha_pattern": [1]}', r"transformer.alpha_pattern is \[1\]; PEFT writes an object"),
        ('{"transformer.alpha_pattern": {"to_(q": 2}}', "'to_\\(q' is not a regular expression"),
    ],
)
def test_bad_peft_header_is_one_sentence(header, message, pipe, tmp_path):
    """Before: json.JSONDecodeError / AttributeError / TypeError tracebacks, or alpha 0 applied."""
    tensors = {k.replace("diffusion_model.", "transformer."): v for k, v in good_tensors(pipe).items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}  # alpha from the header
    save_file(tensors, tmp_path / "h.safetensors", metadata={"lora_adapter_metadata": header})
    with pytest.raises(weights.CheckpointError, match=message):
        pipe.load_lora_weights(tmp_path / "h.safetensors")
    assert not lora.lora_layers(pipe.transformer)


def test_scales_are_finite_and_at_most_100(pipe, tmp_path):
    """Before: a scale of 1e30 (load_lora_weights, set_adapters, --lora FILE:1e30) was applied: a black
    picture. Negative scales and 0 stay allowed (subtracting a LoRA, switching it off)."""
    save_file(good_tensors(pipe), tmp_path / "l.safetensors")
    for scale in (1e30, -101.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be a finite number between -100 and 100"):
            pipe.load_lora_weights(tmp_path / "l.safetensors", scale=scale)
        with pytest.raises(ValueError, match="SCALE of FILE:SCALE must be a finite number between"):
            lora.parse_file_and_scale(f"{tmp_path / 'l.safetensors'}:{scale}")
    assert not lora.lora_layers(pipe.transformer)
    assert lora.parse_file_and_scale(f"{tmp_path / 'l.safetensors'}:-1.5")[1] == -1.5
    name = pipe.load_lora_weights(tmp_path / "l.safetensors", scale=100)
    try:
        with pytest.raises(ValueError, match="adapter weight must be a finite number between -100 and 100"):
            pipe.set_adapters([name], [1e30])
        pipe.set_adapters([name], [0.0])
    finally:
        pipe.unload_lora_weights()


def test_training_alpha_must_be_positive(pipe):
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="an alpha is a finite number > 0"):
            lora.add_adapter(pipe.transformer, "t", alpha=alpha)
    assert not lora.lora_layers(pipe.transformer)


def test_a_lora_on_fp8_weights_gets_the_fp8_message(tiny, pipe, tmp_path):
    """Before: 'It is a LoRA for another model' (the fp8 layers are not nn.Linear, so every module of the
    file seemed unknown); the fp8 message, which says what to do, was never reached."""
    root = tmp_path / "fp8"
    shutil.copytree(tiny, root, ignore=shutil.ignore_patterns("transformer"))
    weights_convert.convert(
        tiny / "transformer", root / "transformer", dtype=torch.float8_e4m3fn, log=lambda *a: None
    )
    fp8_pipe = pipeline.QwenImagePipeline.from_pretrained(root)
    save_file(good_tensors(pipe), tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="this transformer holds fp8 weights.*--merge-lora"):
        fp8_pipe.load_lora_weights(tmp_path / "l.safetensors")


@pytest.mark.parametrize(
    "value, message",
    [
        (0.0, r"latents_std\[3\]=0.0: every latents_std value must be a finite number > 0"),
        (-1.5, r"latents_std\[3\]=-1.5: every latents_std value must be a finite number > 0"),
        (float("inf"), "latents_std=.* is not a valid"),  # the generic config check, as NaN
    ],
)
def test_a_vae_config_whose_latents_std_divides_by_zero(value, message, tiny, tmp_path):
    """Before: a 0 (or negative) latents_std loaded, and normalising divided by it."""
    folder = tmp_path / "vae"
    shutil.copytree(tiny / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["latents_std"][3] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.CheckpointError, match=str(folder / "config.json") + ".*" + message):
        vae.load(folder)
    with pytest.raises(ValueError, match="every latents_std value must be a finite number > 0"):
        vae.VAEConfig(z_dim=2, latents_mean=(0.0, 0.0), latents_std=(1.0, 0.0))


@pytest.mark.parametrize(
    "source, component, message",
    [
        (
            "transformer",
            "vae",
            "is not a Qwen-Image / Wan VAE checkpoint: it holds a transformer .config.json: _class_name 'QwenImageTransformer2DModel'.; pass --component transformer",
        ),
        (
            "vae",
            "transformer",
            "is not a Qwen-Image transformer checkpoint: it holds a VAE .config.json: _class_name 'AutoencoderKLQwenImage'.; pass --component vae",
        ),
        (
            "text_encoder",
            "vae",
            "is not a Qwen-Image / Wan VAE checkpoint: it holds a text encoder .config.json: model_type 'qwen2_5_vl'.; pass --component text_encoder",
        ),
        (
            "vae",
            "text_encoder",
            "is not a Qwen2.5-VL text encoder checkpoint: it holds a VAE .*; pass --component vae",
        ),
        ("transformer", "lora", "is not a LoRA: it holds a transformer .*; pass --component transformer"),
        (
            "transformer.safetensors",
            "vae",
            "is not a Qwen-Image / Wan VAE checkpoint: it holds a transformer .tensor '.*'.; pass --component transformer",
        ),
        (
            "vae.safetensors",
            "transformer",
            "is not a Qwen-Image transformer checkpoint: it holds a VAE .tensor '.*'.; pass --component vae",
        ),
        (
            "lora.safetensors",
            "transformer",
            "is not a Qwen-Image transformer checkpoint: it holds a LoRA .tensor '.*lora_A.*'.; pass --component lora",
        ),
        (".", "vae", "is a model root .model_index.json., not one component: pass its component folder"),
    ],
)
def test_the_converter_names_the_component_it_was_given(
    source, component, message, tiny, pipe, tmp_path, capsys
):
    """Before: a transformer folder as --component vae was 'missing required field(s) [base_dim, ...]' in
    '<config>/config.json', a VAE folder as text_encoder 'no model.safetensors', a LoRA as a transformer
    'not a Qwen-Image transformer checkpoint'."""
    files = {
        "transformer.safetensors": tiny / "transformer" / "diffusion_pytorch_model.safetensors",
        "vae.safetensors": tiny / "vae" / "diffusion_pytorch_model.safetensors",
    }
    if source == "lora.safetensors":
        save_file(good_tensors(pipe), tmp_path / source)
        src = tmp_path / source
    else:
        src = files.get(source, tiny / source)
    dst = tmp_path / ("out.safetensors" if component == "lora" else "out")
    assert weights_convert.main([str(src), str(dst), "--component", component]) == 2
    assert capsys.readouterr().err.startswith(f"error: {src} ") and not dst.exists()
    with pytest.raises(weights.CheckpointError, match=message):
        weights_convert.convert(src, dst, component, log=lambda *a: None)

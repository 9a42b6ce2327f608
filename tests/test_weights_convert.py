"""weights_convert.py: ComfyUI single file <-> official folder, re-sharding and casting, loudly strict."""

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

import weights_convert
from conftest import max_rel_err, randomize_
from qwenimage_minimal import mmdit, text_encoder, weights

# head_dim 128 like the real model, so the converter can infer the whole config from shapes.
TINY = dict(num_layers=2, attention_head_dim=128, num_attention_heads=1, joint_attention_dim=40)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    ref = randomize_(QwenImageTransformer2DModel(**TINY).eval(), seed=7)
    ref.save_pretrained(root / "transformer", max_shard_size="300KB")
    return ref, root / "transformer"


def read_all(folder_or_file):
    if folder_or_file.is_dir():
        return dict(weights.iter_tensors(weights.weight_files(folder_or_file, "diffusion_pytorch_model")))
    return load_file(folder_or_file)


def test_folder_to_single_file_and_back_is_bit_exact(official, tmp_path):
    ref, folder = official
    single = tmp_path / "qwen_image_bf16.safetensors"
    s1 = weights_convert.convert(folder, single)
    back = tmp_path / "transformer"
    s2 = weights_convert.convert(single, back, max_shard_size=weights_convert.parse_size("200KB"))
    original, flat, restored = read_all(folder), read_all(single), read_all(back)
    assert original.keys() == flat.keys() == restored.keys() == ref.state_dict().keys()
    for k in original:
        assert original[k].dtype == restored[k].dtype and torch.equal(original[k], restored[k]), k
        assert torch.equal(original[k], flat[k]), k
    assert s1["tensors_read"] == s1["tensors_written"] == s2["tensors_written"] == len(original)
    assert len(s2["files"]) > 1 and (back / "diffusion_pytorch_model.safetensors.index.json").is_file()
    # the inferred config equals the original (what defines the architecture)
    inferred, orig = (
        json.loads((back / "config.json").read_text()),
        json.loads((folder / "config.json").read_text()),
    )
    for key in mmdit.REQUIRED_FIELDS:
        assert inferred[key] == orig[key], key


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_comfyui_single_file_converts_and_loads(official, tmp_path, prefix):
    """A single file built with ComfyUI's naming (diffusers names, optional prefix), in bf16."""
    ref, _ = official
    comfy = tmp_path / "qwen_image_bf16.safetensors"
    save_file({prefix + k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}, comfy)
    summary = weights_convert.convert(comfy, tmp_path / "transformer", dtype=torch.float32)
    assert summary["prefix_stripped"] == (prefix or "")
    model = mmdit.load(tmp_path / "transformer")
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 12, 64, generator=g), torch.randn(1, 5, 40, generator=g)
    ref_bf16 = QwenImageTransformer2DModel(**TINY).eval()
    ref_bf16.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        expected = ref_bf16(img, txt, None, torch.tensor([0.3]), [[(1, 3, 4)]]).sample
        got = model(img, txt, None, torch.tensor([0.3]), [(1, 3, 4)])
    assert max_rel_err(got, expected) <= 1e-5


def test_unknown_key_fails_loudly(official, tmp_path):
    ref, _ = official
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.ones(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(
        weights.CheckpointError,
        match=r"unexpected in the checkpoint \(1\):\n    transformer_blocks.0.attn.to_q.lora_A.weight",
    ):
        weights_convert.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert weights_convert.main([str(bad), str(tmp_path / "out2")]) == 2
    # a ComfyUI fp8 scale is understood (tests/test_fp8.py), but only beside an fp8 weight
    del state["transformer_blocks.0.attn.to_q.lora_A.weight"]
    state["transformer_blocks.0.attn.to_q.scale_weight"] = torch.ones(())
    save_file(state, bad)
    message = "'transformer_blocks.0.attn.to_q.scale_weight' scales the weight .*, which is stored in float32"
    with pytest.raises(weights.CheckpointError, match=message):
        weights_convert.convert(bad, tmp_path / "out")


def test_missing_tensor_fails_loudly(official, tmp_path):
    ref, _ = official
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "norm_out.linear.bias"}
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(
        weights.CheckpointError, match=r"missing from the checkpoint \(1\):\n    norm_out.linear.bias"
    ):
        weights_convert.convert(bad, tmp_path / "out")


def test_refuses_to_overwrite_without_flag(official, tmp_path):
    _, folder = official
    out = tmp_path / "t.safetensors"
    weights_convert.convert(folder, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        weights_convert.convert(folder, out)
    weights_convert.convert(folder, out, overwrite=True)


def test_cast_and_reshard_folder(official, tmp_path, capsys):
    ref, folder = official
    code = weights_convert.main(
        [str(folder), str(tmp_path / "bf16"), "--dtype", "bf16", "--max-shard-size", "10GB"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{len(ref.state_dict())} tensors read" in printed and "dtype bfloat16" in printed
    assert (tmp_path / "bf16" / "diffusion_pytorch_model.safetensors").is_file()  # one shard: no index
    model = mmdit.load(tmp_path / "bf16")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16)), k


def test_mixed_prefixes_are_rejected(official, tmp_path):
    ref, _ = official
    state = {
        ("model.diffusion_model." if i % 2 else "") + k: v.contiguous()
        for i, (k, v) in enumerate(ref.state_dict().items())
    }
    save_file(state, tmp_path / "mixed.safetensors")
    with pytest.raises(weights.CheckpointError, match="lacks the prefix 'model.diffusion_model.'"):
        weights_convert.convert(tmp_path / "mixed.safetensors", tmp_path / "out")


def test_not_a_transformer(tmp_path):
    save_file({"encoder.conv1.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    with pytest.raises(weights.CheckpointError, match="not a Qwen-Image transformer checkpoint"):
        weights_convert.convert(tmp_path / "vae.safetensors", tmp_path / "out")


# --- text encoder ---------------------------------------------------------------------------

# head_dim 128 and vision width 160 (= 2 heads of 80) like the real model, so configs can be inferred.
TE_TEXT = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
TE_VISION = dict(
    depth=2,
    hidden_size=160,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=256,
    fullatt_block_indexes=[1],
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


@pytest.fixture(scope="module")
def te_official(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("te_convert")
    ref = randomize_(
        Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=TE_TEXT, vision_config=TE_VISION)
        ).eval(),
        seed=3,
    )
    ref.save_pretrained(root / "text_encoder", max_shard_size="300KB")  # official legacy layout
    return ref, root / "text_encoder"


def te_tensors(path):
    if path.is_dir():
        return dict(weights.iter_tensors(weights.weight_files(path, "model")))
    return load_file(path)


def test_text_encoder_expected_names_equal_transformers(te_official):
    """Our accounting of the official names (language model, lm_head, the whole vision tower) is exact."""
    ref, folder = te_official
    config = json.loads((folder / "config.json").read_text())
    official = {k: tuple(v.shape) for k, v in te_tensors(folder).items()}
    assert weights_convert._text_encoder_expected(config) == official


def test_text_encoder_layouts_round_trip_bit_exact(te_official, tmp_path):
    ref, folder = te_official
    t5 = tmp_path / "te_t5"
    weights_convert.convert(folder, t5, component="text_encoder", layout="transformers5")
    assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in te_tensors(t5))
    assert te_tensors(t5).keys() == ref.state_dict().keys()  # transformers 5.x's own names
    single = tmp_path / "qwen_2.5_vl_7b.safetensors"
    weights_convert.convert(t5, single, component="text_encoder")  # either layout is read
    back = tmp_path / "te_back"
    weights_convert.convert(
        single, back, component="text_encoder", max_shard_size=weights_convert.parse_size("200KB")
    )
    original, restored = te_tensors(folder), te_tensors(back)
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    a, b = text_encoder.load(folder), text_encoder.load(t5)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_comfyui_text_encoder_file_without_lm_head(te_official, tmp_path):
    """A ComfyUI-style single file: the legacy names, here without lm_head; converts, loads, matches."""
    ref, folder = te_official
    state = {k: v for k, v in te_tensors(folder).items() if k != "lm_head.weight"}
    comfy = tmp_path / "qwen_2.5_vl_7b.safetensors"
    save_file(state, comfy)
    summary = weights_convert.convert(comfy, tmp_path / "text_encoder", component="text_encoder")
    assert summary["absent"] == ["lm_head.weight"]
    model = text_encoder.load(tmp_path / "text_encoder")
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert max_rel_err(model(ids), expected) <= 1e-5


def test_text_encoder_partial_vision_tower_and_unknown_keys_fail(te_official, tmp_path):
    _, folder = te_official
    state = te_tensors(folder)
    partial = {k: v for k, v in state.items() if not k.startswith("visual.blocks.1.")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(
        weights.CheckpointError, match=r"missing from the checkpoint \(12\):\n    visual.blocks.1"
    ):
        weights_convert.convert(
            tmp_path / "partial.safetensors",
            tmp_path / "out",
            component="text_encoder",
            config_path=folder / "config.json",
        )
    save_file(
        {**state, "model.layers.0.self_attn.q_proj.scale_weight": torch.ones(1)}, tmp_path / "fp8.safetensors"
    )
    with pytest.raises(
        weights.CheckpointError,
        match="unexpected in the checkpoint \\(1\\):\n    model.layers.0.self_attn.q_proj.scale_weight",
    ):
        weights_convert.convert(tmp_path / "fp8.safetensors", tmp_path / "out", component="text_encoder")


# --- VAE --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_official(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage

    root = tmp_path_factory.mktemp("vae_convert")
    ref = randomize_(AutoencoderKLQwenImage(base_dim=16).eval(), seed=9)
    ref.save_pretrained(root / "vae")
    return ref, root / "vae"


def test_vae_wan_names_agree_with_diffusers_own_converter(vae_official, tmp_path):
    """Our Wan naming, read back by diffusers' convert_wan_vae_to_diffusers (an independent mapping),
    gives the official names again."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref, folder = vae_official
    wan_file = tmp_path / "qwen_image_vae.safetensors"
    weights_convert.convert(folder, wan_file, component="vae")
    wan = load_file(wan_file)
    assert "encoder.conv1.weight" in wan and "decoder.upsamples.4.shortcut.weight" in wan
    assert "encoder.middle.1.to_qkv.weight" in wan and "conv2.weight" in wan
    back = convert_wan_vae_to_diffusers(wan)
    original = ref.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_vae_wan_file_to_folder_round_trip_and_load(vae_official, tmp_path):
    ref, folder = vae_official
    wan_file = tmp_path / "qwen_image_vae.safetensors"
    weights_convert.convert(folder, wan_file, component="vae")
    back = tmp_path / "vae"
    summary = weights_convert.convert(wan_file, back, component="vae")
    assert summary["tensors_written"] == len(ref.state_dict())
    original = dict(weights.iter_tensors(weights.weight_files(folder, "diffusion_pytorch_model")))
    restored = dict(weights.iter_tensors(weights.weight_files(back, "diffusion_pytorch_model")))
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    inferred, orig = (
        json.loads((back / "config.json").read_text()),
        json.loads((folder / "config.json").read_text()),
    )
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean"):
        assert inferred[key] == orig[key], key
    from qwenimage_minimal import vae

    model = vae.load(back)
    z = torch.randn(1, 16, 4, 5)
    with torch.no_grad():
        assert max_rel_err(model.decode(z), ref.decode(z[:, :, None]).sample[:, :, 0]) <= 1e-5


def test_vae_unknown_key_fails(vae_official, tmp_path):
    _, folder = vae_official
    wan_file = tmp_path / "w.safetensors"
    weights_convert.convert(folder, wan_file, component="vae")
    state = load_file(wan_file)
    state["decoder.upsamples.3.resample.9.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(
        weights.CheckpointError,
        match=r"unexpected in the checkpoint \(1\):\n    decoder.upsamples.3.resample.9.weight",
    ):
        weights_convert.convert(tmp_path / "bad.safetensors", tmp_path / "out", component="vae")

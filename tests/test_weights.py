"""weights.py: loading official folders (sharded or single file) and every way that can go wrong."""

import json
import shutil

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import randomize_
from qwenimage_minimal import mmdit, weights, writing

TINY = dict(
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny diffusers transformer saved twice: sharded (with index) and as one file."""
    root = tmp_path_factory.mktemp("load")
    ref = randomize_(QwenImageTransformer2DModel(**TINY).eval(), seed=5)
    ref.save_pretrained(root / "sharded", max_shard_size="50KB")
    ref.save_pretrained(root / "single", max_shard_size="10GB")
    assert (root / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (root / "single" / "diffusion_pytorch_model.safetensors").is_file()
    return ref, root


@pytest.fixture
def folder(reference, tmp_path):
    """A fresh, writable copy of the sharded folder, for tests that damage it."""
    dst = tmp_path / "transformer"
    shutil.copytree(reference[1] / "sharded", dst)
    return dst


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_both_layouts_load_every_tensor_exactly(reference, layout):
    ref, root = reference
    model = mmdit.load(root / layout)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad is False for p in model.parameters())  # trainable as loaded


def test_dtype_and_device_requests(reference):
    model = mmdit.load(reference[1] / "sharded", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_our_reader_agrees_with_the_safetensors_library(reference, tmp_path):
    path = reference[1] / "single" / "diffusion_pytorch_model.safetensors"
    header = weights.SafetensorsFile(path)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(header.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), header.read(k)), k
    # and files we write are read back by the library, for every dtype we use
    tensors = {
        "a": torch.randn(3, 4).bfloat16(),
        "b": torch.arange(5),
        "c": torch.randn(2, 2, 2).half(),
        "d": torch.tensor(1.5),
        "e": torch.zeros(0, 3),
    }
    out = tmp_path / "x.safetensors"
    writing.write_safetensors(
        out, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], tensors.values()
    )
    with safe_open(out, framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_missing_shard_names_the_file(folder):
    shard = sorted(folder.glob("*.safetensors"))[1]
    assert shard.name.startswith("diffusion_pytorch_model-00002-of-")
    shard.unlink()
    with pytest.raises(
        weights.CheckpointError, match=r"shard file\(s\) \['diffusion_pytorch_model-00002-of-"
    ):
        mmdit.load(folder)


def test_truncated_file_is_caught_before_use(folder):
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        weights.CheckpointError, match=rf"{shard.name} is truncated: tensor '.*' ends at byte"
    ):
        mmdit.load(folder)
    shard.write_bytes(data[:5])
    with pytest.raises(
        weights.CheckpointError, match=rf"{shard.name} is truncated or not a safetensors file"
    ):
        mmdit.load(folder)


def test_corrupt_header_is_an_error(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(weights.CheckpointError, match=rf"{shard.name} has a corrupt safetensors header"):
        mmdit.load(folder)


def test_missing_config_field_is_named(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["joint_attention_dim"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        weights.CheckpointError, match=r"missing required field\(s\) \['joint_attention_dim'\]"
    ):
        mmdit.load(folder)


def test_config_that_contradicts_the_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(
        weights.CheckpointError, match=r"says num_layers=3 but the weights hold 2 transformer_blocks"
    ):
        mmdit.load(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "joint_attention_dim": 32}))
    with pytest.raises(
        weights.CheckpointError,
        match=r"shape mismatch \(2\):\n    txt_in.weight: checkpoint \[32, 24\] vs model \[32, 32\]",
    ):
        mmdit.load(folder)


def test_unexpected_and_missing_keys_are_listed(reference, tmp_path):
    ref, _ = reference
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(2, 32)
    del state["proj_out.bias"]
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(weights.CheckpointError) as e:
        mmdit.load(tmp_path)
    assert "missing from the checkpoint (1):\n    proj_out.bias" in str(e.value)
    assert "unexpected in the checkpoint (1):\n    transformer_blocks.0.attn.to_q.lora_A.weight" in str(
        e.value
    )


def test_no_weights_or_only_pickles(tmp_path, reference):
    shutil.copy(reference[1] / "single" / "config.json", tmp_path / "config.json")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        weights.CheckpointError, match="no diffusion_pytorch_model.safetensors and no .*index.json"
    ):
        mmdit.load(tmp_path)


def test_model_root_instead_of_component_folder(tmp_path, reference):
    shutil.copytree(reference[1] / "single", tmp_path / "transformer")
    with pytest.raises(weights.CheckpointError, match=r"pass one of its component folders \(transformer\)"):
        mmdit.load(tmp_path)


def test_unsupported_variant_flag(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": True}))
    with pytest.raises(weights.CheckpointError, match="guidance_embeds=True"):
        mmdit.load(folder)


def test_index_and_shard_disagree(folder):
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"].values())[0]
    moved = next(k for k, v in data["weight_map"].items() if v != first)
    data["weight_map"][moved] = first
    index.write_text(json.dumps(data))
    with pytest.raises(weights.CheckpointError, match=rf"{first} does not hold tensor '{moved}'"):
        mmdit.load(folder)

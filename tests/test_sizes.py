"""sizes.py: the size table and the checkpoint writer; every size in the pipelines follows the loaded
configs (a 4-channel VAE with 4x downsampling, a 48-wide text encoder), checked against diffusers."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from qwenimage_minimal import mmdit, pipeline, sizes, vae, weights
from qwenimage_minimal.mmdit import MMDiTConfig
from qwenimage_minimal.text_encoder import TextEncoderConfig
from qwenimage_minimal.vae import VAEConfig
from qwenimage_minimal.vision import VisionConfig

# Not the official sizes anywhere: latent channels 4 (so the MMDiT's in_channels is 16), a VAE that
# downsamples 4x (three stages), a text encoder and MMDiT text width of 48.
SMALL_LATENTS = sizes.ModelSize(
    text_encoder=TextEncoderConfig(
        vocab_size=151680,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 2, 2),
    ),
    vision=VisionConfig(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=48,
        fullatt_block_indexes=(0,),
    ),
    transformer=MMDiTConfig(
        in_channels=16,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        joint_attention_dim=48,
        axes_dims_rope=(8, 12, 12),
    ),
    vae=VAEConfig(
        base_dim=8,
        z_dim=4,
        dim_mult=(1, 2, 4),
        temperal_downsample=(False, True),
        latents_mean=(0.1, -0.2, 0.3, -0.4),
        latents_std=(1.5, 0.8, 2.0, 1.2),
    ),
)


def test_the_table():
    tiny, official = sizes.SIZES["tiny"], sizes.SIZES["official"]
    assert official.transformer == MMDiTConfig() and official.vae == VAEConfig()
    assert (
        tiny.text_encoder.hidden_size == tiny.transformer.joint_attention_dim == tiny.vision.out_hidden_size
    )
    assert tiny.transformer.latent_channels == tiny.vae.z_dim == 16
    with torch.device("meta"):
        assert round(sum(p.numel() for p in mmdit.MMDiT(official.transformer).parameters()) / 1e9, 2) == 20.43


@pytest.fixture(scope="module")
def small_latents_folder(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("sizes") / "small-latents", SMALL_LATENTS)


def test_non_official_sizes_match_diffusers(small_latents_folder):
    """Packing, noise, schedule length, unpacking and decoding all follow the configs, as diffusers'
    pipeline does (it reads in_channels // 4 and 2 ** len(temperal_downsample))."""
    ref = QwenImagePipeline.from_pretrained(small_latents_folder)
    ref.set_progress_bar_config(disable=True)
    ours = pipeline.QwenImagePipeline.from_pretrained(small_latents_folder)
    assert (ours.vae_scale_factor, ours.size_multiple, ref.vae_scale_factor) == (4, 8, 4)
    kwargs = dict(
        prompt=["a cat", "a red bicycle by a wall"],
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=40,
        width=56,
        num_inference_steps=3,
    )
    gen = lambda: torch.Generator().manual_seed(3)
    expected = ref(generator=gen(), output_type="latent", **kwargs).images
    got = ours(generator=gen(), output_type="latent", progress=False, **kwargs).images
    assert got.shape == expected.shape == (2, (40 // 8) * (56 // 8), 16)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    expected = ref(generator=gen(), output_type="np", **kwargs).images
    got = ours(generator=gen(), output_type="np", progress=False, **kwargs).images
    assert got.shape == expected.shape == (2, 40, 56, 3)
    assert np.abs(got - expected).max() <= 1e-5


def test_sizes_are_checked_against_the_vae(small_latents_folder):
    ae = vae.load(small_latents_folder / "vae")
    with pytest.raises(ValueError, match="multiples of 4, got 42x56"):
        ae.encode(torch.zeros(1, 3, 42, 56))
    ours = pipeline.QwenImagePipeline.from_pretrained(small_latents_folder)
    with pytest.warns(UserWarning, match="multiples of 8; 44x56 is rounded down to 40x56"):
        out = ours(
            prompt="x",
            height=44,
            width=56,
            num_inference_steps=1,
            true_cfg_scale=1,
            progress=False,
            output_type="np",
        )
    assert out.images.shape == (1, 40, 56, 3)


def test_components_that_do_not_belong_together(small_latents_folder, tmp_path):
    """A 16-channel VAE beside an MMDiT for 4-channel latents, and a vocabulary the text encoder
    cannot embed, are refused when the pipeline is built, naming both sides."""
    mixed = sizes.write_checkpoint(
        tmp_path / "mixed", dataclasses.replace(SMALL_LATENTS, vae=VAEConfig(base_dim=8))
    )
    with pytest.raises(weights.CheckpointError, match="reads 4 and writes 4 latent channels .* z_dim is 16"):
        pipeline.QwenImagePipeline.from_pretrained(mixed)
    small_vocab = dataclasses.replace(SMALL_LATENTS.text_encoder, vocab_size=1000)
    folder = sizes.write_checkpoint(
        tmp_path / "vocab", dataclasses.replace(SMALL_LATENTS, text_encoder=small_vocab)
    )
    with pytest.raises(
        weights.CheckpointError, match="tokenizer has 151665 tokens but the text encoder embeds only 1000"
    ):
        pipeline.QwenImagePipeline.from_pretrained(folder)


def test_each_config_writes_its_own_config_json(small_latents_folder):
    """The written config.json files are the configs' own to_json(), and read back to the same configs."""
    read = lambda *parts: json.loads(small_latents_folder.joinpath(*parts).read_text())
    assert mmdit.config_from_folder(small_latents_folder / "transformer") == SMALL_LATENTS.transformer
    assert vae.config_from_json(read("vae", "config.json")) == SMALL_LATENTS.vae
    assert read("transformer", "config.json") == SMALL_LATENTS.transformer.to_json()
    assert read("scheduler", "scheduler_config.json") == SMALL_LATENTS.scheduler.to_json()


def test_edit_layout_and_unknown_names(tmp_path):
    root = sizes.write_checkpoint(tmp_path / "edit", "tiny", "QwenImageEditPlusPipeline")
    index = json.loads((root / "text_encoder" / "model.safetensors.index.json").read_text())
    assert {v for k, v in index["weight_map"].items() if k.startswith("visual.")} == {
        "model-00002-of-00002.safetensors"
    }
    assert (root / "processor" / "preprocessor_config.json").is_file()
    assert (
        pipeline.QwenImageEditPipeline.from_pretrained(root).vision_tower.config == sizes.SIZES["tiny"].vision
    )
    with pytest.raises(ValueError, match="size must be one of"):
        sizes.write_checkpoint(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="pipeline_class must be one of"):
        sizes.write_checkpoint(tmp_path / "x", "tiny", "FluxPipeline")

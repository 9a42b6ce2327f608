"""text_encoder.py against transformers' Qwen2_5_VLForConditionalGeneration and diffusers' encode_prompt."""

import json

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import save_file
from test_tokenizer import write_official_tokenizer_folder
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from conftest import max_rel_err, randomize_
from qwenimage_minimal import prompts, text_encoder, tokenizer
from qwenimage_minimal.weights import CheckpointError

TOL = 1e-5
# Tiny, but with the real vocabulary size so real token ids work, and head_dim 16 = 2 * (2 + 3 + 3).
TEXT = dict(
    vocab_size=151680,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
)
VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=64,
    fullatt_block_indexes=[1],
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


def make_reference(seed=0):
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION)
    ).eval()
    randomize_(model, seed=seed)
    with torch.no_grad():  # sharpen q and k so that positions (RoPE) visibly matter
        for name, p in model.named_parameters():
            if "self_attn.q_proj" in name or "self_attn.k_proj" in name:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    model = make_reference()
    model.save_pretrained(root / "text_encoder", max_shard_size="5MB")  # legacy key layout, sharded
    assert len(list((root / "text_encoder").glob("*.safetensors"))) > 1
    write_official_tokenizer_folder(root / "tokenizer")
    return model, root


@pytest.fixture(scope="module")
def ours(reference):
    return text_encoder.load(reference[1] / "text_encoder")


def reference_hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def test_official_files_use_the_legacy_layout(reference):
    keys = json.loads((reference[1] / "text_encoder" / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.embed_tokens.weight" in keys
    assert any(k.startswith("visual.") for k in keys) and "lm_head.weight" in keys


def test_last_hidden_state_matches_transformers(reference, ours):
    model, _ = reference
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151664, (3, 23), generator=g)
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[1, 15:] = 0  # right padding, as the tokenizer produces
    mask[2, 4:] = 0
    expected = reference_hidden(model, ids, mask)
    with torch.no_grad():
        got = ours(ids, mask)
    assert got.shape == expected.shape == (3, 23, 64)
    # Compared on the real tokens: what a padding position computes is never used, and the two
    # implementations give those rows different (equally meaningless) positions.
    real = mask.bool()
    assert max_rel_err(got[real], expected[real]) <= TOL
    with torch.no_grad():  # no mask at all: the causal fast path
        assert max_rel_err(ours(ids[:1]), reference_hidden(model, ids[:1], None)) <= TOL


def test_positions_matter(ours):
    """Guard against RoPE doing nothing: the same tokens in another order give other states for the last token."""
    ids = torch.tensor([[100, 200, 300, 400, 500]])
    with torch.no_grad():
        a, b = ours(ids), ours(ids[:, [1, 0, 2, 3, 4]])
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-3


def test_transformers5_layout_loads(reference, tmp_path):
    model, root = reference
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    state = {
        k: v.contiguous() for k, v in model.state_dict().items()
    }  # model.language_model.*, model.visual.*
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    loaded = text_encoder.load(folder)
    legacy = text_encoder.load(root / "text_encoder")
    for k, v in legacy.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_lm_head_and_vision_are_not_loaded(reference):
    model = text_encoder.load(reference[1] / "text_encoder")
    names = set(model.state_dict())
    assert not any("lm_head" in n or "visual" in n for n in names)
    assert len(names) == 3 * 12 + 2


def test_official_legacy_config_form(reference, tmp_path):
    """The official config.json has the text fields at the top (transformers 4.x) with rope_scaling."""
    raw = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "vocab_size": 152064,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "vision_config": {"depth": 32, "hidden_size": 1280},
    }
    assert text_encoder.config_from_json(raw) == text_encoder.TextEncoderConfig()
    with pytest.raises(CheckpointError, match=r"missing required field\(s\) \['rope_theta'\]"):
        text_encoder.config_from_json({k: v for k, v in raw.items() if k != "rope_theta"})


@pytest.fixture(scope="module")
def diffusers_pipe(reference):
    model, root = reference
    hf_tok = Qwen2Tokenizer.from_pretrained(root / "tokenizer")
    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=hf_tok, transformer=None)


@pytest.mark.parametrize(
    "texts",
    [
        ["A red fox in the snow, studio light"],
        ["a cat", "一只戴着帽子的狗在滑板上，旁边写着“通义千问”", "text: 'Hello, World!' on a neon sign, 4k"],
    ],
)
def test_encode_prompt_matches_diffusers(reference, ours, diffusers_pipe, texts):
    tok = tokenizer.load(reference[1] / "tokenizer")
    embeds, mask = prompts.encode_prompts(tok, ours, texts)
    with torch.no_grad():
        ref_embeds, ref_mask = diffusers_pipe.encode_prompt(texts, device=torch.device("cpu"))
    assert embeds.shape == ref_embeds.shape
    assert max_rel_err(embeds, ref_embeds) <= TOL
    if ref_mask is None:  # diffusers drops an all-ones mask; ours always returns it
        assert bool(mask.all())
    else:
        assert torch.equal(mask, ref_mask)
    if len(texts) > 1:
        assert not bool(mask.all())  # the batch really exercised padding
        assert embeds[mask == 0].abs().max() == 0


def test_long_prompt_is_truncated_with_a_warning(reference, ours, diffusers_pipe):
    tok = tokenizer.load(reference[1] / "tokenizer")
    prompt = "a very long description of a scene " * 160  # ~1100 tokens
    with pytest.warns(
        UserWarning, match=r"prompt 0 is \d+ tokens long with the template; only the first 1024"
    ):
        embeds, mask = prompts.encode_prompts(tok, ours, [prompt, "short"])
    with torch.no_grad():
        ref_embeds, ref_mask = diffusers_pipe.encode_prompt([prompt, "short"], device=torch.device("cpu"))
    assert embeds.shape[1] == 1024 and max_rel_err(embeds, ref_embeds) <= TOL
    assert torch.equal(mask, ref_mask)
    with pytest.warns(UserWarning, match="only the first 100 are used"):  # the number really kept
        short, _ = prompts.encode_prompts(tok, ours, [prompt], max_sequence_length=100)
    assert short.shape[1] == 100


def test_bad_prompts(reference, ours):
    tok = tokenizer.load(reference[1] / "tokenizer")
    with pytest.raises(ValueError, match="non-empty list of str"):
        prompts.encode_prompts(tok, ours, [])
    with pytest.raises(TypeError, match=r"prompt\(s\) at index \[1\] are not str: \['int'\]"):
        prompts.encode_prompts(tok, ours, ["ok", 5])
    with pytest.raises(ValueError, match="max_sequence_length must be in 1..1024"):
        prompts.encode_prompts(tok, ours, ["ok"], max_sequence_length=2000)


def test_config_that_contradicts_the_weights(reference, tmp_path):
    import shutil

    folder = tmp_path / "te"
    shutil.copytree(reference[1] / "text_encoder", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch \(9\):\n    model.layers.0.mlp.down_proj.weight"
    ):
        text_encoder.load(folder)


def test_full_config_names_and_shapes_equal_the_official_legacy_keys():
    """Qwen2.5-VL-7B on the meta device: our expected names/shapes == the official file's keys (renamed)."""
    full_text = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    full_vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
        window_size=112,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    with torch.device("meta"):
        ref = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=full_text, vision_config=full_vision)
        )
        ours = text_encoder.TextEncoder(text_encoder.TextEncoderConfig())
    # transformers 5 names -> the legacy names the official files use
    legacy = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tuple(v.shape)
        for k, v in ref.state_dict().items()
    }
    loaded = {text_encoder.checkpoint_name_to_ours(k): s for k, s in legacy.items()}
    skipped = [k for k in legacy if text_encoder.checkpoint_name_to_ours(k) is None]
    loaded.pop(None)
    assert loaded == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(loaded) == 338
    assert set(skipped) == {k for k in legacy if k.startswith("visual.")} | {"lm_head.weight"}
    assert sum(p.numel() for p in ours.parameters()) / 1e9 == pytest.approx(7.07, abs=0.01)


def test_bf16_matches_transformers_in_bf16(reference):
    """Rounding happens where the reference's does: RoPE cos/sin cast to bf16, RMSNorm weight after the cast.
    The reference is loaded as diffusers loads it, with from_pretrained(dtype=bf16), which keeps the
    RoPE frequencies in fp32 (a model cast with .to(bf16) would round them too)."""
    _, root = reference
    ours = text_encoder.load(root / "text_encoder", dtype=torch.bfloat16)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        root / "text_encoder", dtype=torch.bfloat16
    ).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 151664, (2, 17), generator=g)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 11:] = 0
    expected = reference_hidden(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, mask)
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    assert max_rel_err(got[real], expected[real]) <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make cuda-check)")
def test_full_width_bf16_on_cuda_matches_transformers(tmp_path):
    """Two decoder layers at the official size (3584 wide, 28/4 heads, SwiGLU 18944, full vocabulary),
    a padded batch of 2 x 300 tokens, loaded from a bf16 folder onto the GPU, against transformers
    loaded the way diffusers loads it. Ours must agree with it and be as close to fp32 as it is."""
    full = dict(
        TEXT,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=2,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=full, vision_config=VISION)
        ).eval()
    randomize_(ref, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151643, (2, 300), generator=g).cuda()
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    mask[1, 180:] = 0
    real = mask.bool()
    truth = reference_hidden(ref, ids, mask)[real]
    ref.save_pretrained(tmp_path / "te", max_shard_size="2GB")
    del ref
    ref16 = (
        Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "te", dtype=torch.bfloat16)
        .cuda()
        .eval()
    )
    expected = reference_hidden(ref16, ids, mask)[real]
    del ref16
    ours = text_encoder.load(tmp_path / "te", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = ours(ids, mask)[real]
    err_vs_ref = max_rel_err(got, expected)
    err_ours, err_ref = max_rel_err(got, truth), max_rel_err(expected, truth)
    print(
        f"\nbf16 cuda, 2 full-width Qwen2.5-VL layers: ours vs transformers-bf16 {err_vs_ref:.2e}; "
        f"vs fp32: ours {err_ours:.2e}, transformers {err_ref:.2e}"
    )
    assert err_vs_ref <= 2e-2
    assert err_ours <= 1.25 * err_ref + 1e-3

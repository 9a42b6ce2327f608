"""vision.py (processor, vision tower) and the multimodal prompt encoding of text_encoder.py, against transformers.

The reference is transformers' Qwen2_5_VLForConditionalGeneration with tiny random weights (q/k
sharpened so positions matter), saved with save_pretrained, and its PIL image processor
(transformers 5.23's Qwen2VLProcessor wants a video processor, which needs torchvision, which
cannot be installed beside the CPU torch wheel: the model is called directly instead).
"""

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from PIL import Image
from test_text_encoder import make_reference
from test_tokenizer import write_official_tokenizer_folder
from transformers import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import max_rel_err
from qwenimage_minimal import images, prompts, text_encoder, tokenizer, vision
from qwenimage_minimal.weights import CheckpointError

TOL = 1e-5
IMAGE_PAD_ID = 151655


def random_image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    # smooth-ish content, so resizing does something visible
    base = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-20, 21, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


# ---------------------------------------------------------------------------------------------
# The image processor
# ---------------------------------------------------------------------------------------------

SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 30)  # small limits, so both bounds are hit


@pytest.mark.parametrize(
    "size,limits",
    [
        ((37, 53), {}),  # tiny: below min_pixels (3136) with the official limits
        ((301, 207), {}),  # odd sizes, rounded to multiples of 28
        ((1000, 24), {}),  # very wide
        ((120, 500), SMALL),  # above max_pixels
        ((30, 40), SMALL),  # below min_pixels
        ((224, 336), SMALL),  # between the bounds
    ],
)
def test_processor_matches_transformers(size, limits):
    h, w = size
    img = random_image(h, w, seed=h * w)
    config = images.ImageProcessorConfig(**limits)
    ref = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels)(
        images=[img], return_tensors="pt"
    )
    pixels, grid = images.preprocess(img, config)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert pixels.dtype == torch.float32 and pixels.shape == ref["pixel_values"].shape
    assert torch.equal(pixels, ref["pixel_values"])  # exactly: same resize, same roundings
    t, gh, gw = grid
    assert config.min_pixels <= gh * gw * 14 * 14 <= config.max_pixels
    assert images.image_token_count(grid) == gh * gw // 4


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK"])
def test_processor_converts_modes_like_transformers(mode):
    img = random_image(90, 130, seed=3)
    if mode in ("RGBA", "LA"):
        a = np.asarray(img.convert("RGBA")).copy()
        a[..., 3] = np.linspace(0, 255, a.shape[1]).astype(np.uint8)[None]  # a transparency ramp
        img = Image.fromarray(a, "RGBA").convert(mode)
    else:
        img = img.convert(mode)
    ref = Qwen2VLImageProcessorPil()(images=[img], return_tensors="pt")
    pixels, _ = images.preprocess(img)
    assert torch.equal(pixels, ref["pixel_values"])


def test_to_rgb_accepts_arrays_and_tensors():
    img = random_image(40, 60, seed=5)
    a = np.array(img)
    for x in (
        a,
        a.astype(np.float32) / 255,
        torch.from_numpy(a).permute(2, 0, 1),
        torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255,
    ):
        assert np.array_equal(np.asarray(images.to_rgb(x)), a)
    assert np.array_equal(np.asarray(images.to_rgb(img)), a)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (Image.new("RGB", (0, 4)), "empty"),
        (np.zeros((4, 4, 2), np.uint8), r"\(H, W, C\) with C in 1, 3, 4"),
        (np.full((4, 4, 3), 1.5, np.float32), r"in \[0, 1\]"),
        (torch.zeros(2, 3, 4, 4), r"\(C, H, W\) or \(1, C, H, W\)"),
        ("cat.png", "open it first"),
        (42, "must be a PIL image"),
    ],
)
def test_to_rgb_rejects_bad_images(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        images.to_rgb(bad, name="image")


def test_processor_config_both_forms(tmp_path):
    official = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(images.CLIP_MEAN),
        "image_std": list(images.CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    assert images.processor_config_from_json(official) == images.ImageProcessorConfig()
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056).save_pretrained(tmp_path)  # 5.x: size dict
    assert images.load_processor_config(tmp_path) == images.ImageProcessorConfig()
    with pytest.raises(CheckpointError, match="missing"):
        images.processor_config_from_json({"patch_size": 14})
    with pytest.raises(CheckpointError, match="preprocessor_config.json not found"):
        images.load_processor_config(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# The vision tower
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    model = make_reference(seed=4)
    with torch.no_grad():  # sharpen the tower's q/k too, so its 2-D RoPE and windows visibly matter
        qkv = model.model.visual.blocks[0].attn.qkv.weight
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * qkv.shape[1]].mul_(4.0)
    model.save_pretrained(root / "text_encoder", max_shard_size="5MB")
    write_official_tokenizer_folder(root / "tokenizer")
    return model, root


@pytest.fixture(scope="module")
def tower(reference):
    return vision.load(reference[1] / "text_encoder")


def test_window_order_matches_transformers():
    from transformers.vision_utils import get_vision_window_index

    config = vision.VisionConfig()
    grids = [(1, 18, 26), (1, 16, 16), (2, 6, 10)]
    order, lengths = vision.window_order(grids, config)
    ref_order, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    assert torch.equal(order, ref_order)
    assert torch.equal(torch.tensor([0, *lengths]).cumsum(0), ref_cu.long())
    assert len(lengths) == 12 + 4 + 2 * 2  # 3x4 windows, 2x2 (exact fit), 2 frames x 1x2


@pytest.mark.parametrize("sizes", [[(250, 180)], [(252, 364), (100, 60)]])
def test_vision_tower_matches_transformers(reference, tower, sizes):
    model, _ = reference
    pictures = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    inputs = [images.preprocess(img) for img in pictures]
    pixels = torch.cat([p for p, _ in inputs])
    grids = [g for _, g in inputs]
    order, lengths = vision.window_order(grids, tower.config)
    assert len(lengths) > len(grids)  # more than one window per image: windows are exercised
    with torch.no_grad():
        got = tower(pixels, grids)
        expected = model.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
    assert got.shape == expected.shape == (sum(images.image_token_count(g) for g in grids), 64)
    assert max_rel_err(got, expected) <= TOL


def test_windows_and_full_attention_both_matter(tower):
    """Guard against a test that cannot fail: making every block full-attention (or windowed) changes the output."""
    img = random_image(250, 180, seed=1)
    pixels, grid = images.preprocess(img)
    with torch.no_grad():
        base = tower(pixels, [grid])
        full = tower.config.fullatt_block_indexes
        try:
            tower.config.fullatt_block_indexes = ()
            windowed = tower(pixels, [grid])
            tower.config.fullatt_block_indexes = tuple(range(tower.config.depth))
            everywhere = tower(pixels, [grid])
        finally:
            tower.config.fullatt_block_indexes = full
    assert (base - windowed).abs().max() > 1e-3 and (base - everywhere).abs().max() > 1e-3


def test_vision_load_errors(reference, tmp_path):
    with pytest.raises(CheckpointError, match="no vision_config"):
        vision.config_from_json({"hidden_size": 64})
    # the language-model-only tensors of a text-to-image export are not enough for the tower
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    from safetensors.torch import save_file

    state = {k: v for k, v in reference[0].state_dict().items() if "visual" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text((reference[1] / "text_encoder" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        vision.load(folder)


# ---------------------------------------------------------------------------------------------
# The multimodal prompt: image features in the prompt, 3-D positions
# ---------------------------------------------------------------------------------------------


def edit_inputs(tok, instructions, pictures, numbered=True):
    """What the Edit pipelines feed the encoder: the Edit template with image placeholders."""
    inputs = [images.preprocess(img) for img in pictures]
    prefix = prompts.edit_prompt_prefix(len(pictures), numbered)
    texts = [prefix + p for p in instructions]
    return texts, torch.cat([p for p, _ in inputs]), [g for _, g in inputs]


def reference_ids(tok, texts, grids):
    """Token ids as Qwen2VLProcessor builds them: each <|image_pad|> repeated by its image's token count."""
    ids = [
        prompts.expand_image_pads(
            tok.encode(prompts.EDIT_TEMPLATE.format(t)),
            IMAGE_PAD_ID,
            [images.image_token_count(g) for g in grids],
        )
        for t in texts
    ]
    return tok.pad(ids)


@pytest.mark.parametrize("case", ["one image", "two images, two prompts"])
def test_multimodal_encoding_matches_transformers_with_mm_token_type_ids(reference, tower, case):
    model, root = reference
    tok = tokenizer.load(root / "tokenizer")
    ours = text_encoder.load(root / "text_encoder")
    if case == "one image":
        instructions, pictures = ["Make the sky purple"], [random_image(250, 180, seed=7)]
    else:
        instructions = ["Put the cat from picture 1 on the sofa of picture 2", "swap them"]
        pictures = [random_image(250, 180, seed=7), random_image(120, 300, seed=8)]
    texts, pixels, grids = edit_inputs(tok, instructions, pictures)
    with torch.no_grad():
        features = tower(pixels, grids)
    embeds, mask = prompts.encode_prompts(
        tok,
        ours,
        texts,
        prompts.EDIT_TEMPLATE,
        prompts.EDIT_PREFIX_TOKENS,
        max_sequence_length=None,
        image_features=features,
        image_grid_thw=grids,
    )

    input_ids, attention_mask = reference_ids(tok, texts, grids)
    with torch.no_grad():
        hidden = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.cat([pixels] * len(texts)),
            image_grid_thw=torch.tensor(grids * len(texts)),
            mm_token_type_ids=(input_ids == IMAGE_PAD_ID).int(),
            output_hidden_states=True,
        ).hidden_states[-1]
    for b in range(len(texts)):
        expected = hidden[b][attention_mask[b].bool()][prompts.EDIT_PREFIX_TOKENS :]
        n = len(expected)
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert max_rel_err(embeds[b, :n], expected) <= TOL

    # The 3-D positions are what transformers computes from mm_token_type_ids.
    ref_pos, _ = model.model.get_rope_index(
        input_ids,
        (input_ids == IMAGE_PAD_ID).int(),
        image_grid_thw=torch.tensor(grids * len(texts)),
        attention_mask=attention_mask,
    )
    got_pos = text_encoder.multimodal_position_ids(
        input_ids, attention_mask, grids * len(texts), IMAGE_PAD_ID
    )
    real = attention_mask.bool()
    assert torch.equal(got_pos[:, real], ref_pos[:, real])


def test_position_ids_by_hand():
    """An image of 4x6 patches (2x3 groups) after 3 text tokens, then 2 more text tokens."""
    ids = torch.tensor([[1, 2, 3] + [IMAGE_PAD_ID] * 6 + [4, 5]])
    pos = text_encoder.multimodal_position_ids(ids, torch.ones_like(ids), [(1, 4, 6)], IMAGE_PAD_ID)
    assert pos[:, 0, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 0, 3:9].tolist() == [3] * 6  # frame
    assert pos[1, 0, 3:9].tolist() == [3, 3, 3, 4, 4, 4]  # row
    assert pos[2, 0, 3:9].tolist() == [3, 4, 5, 3, 4, 5]  # column
    assert pos[:, 0, 9:].tolist() == [[6, 7]] * 3  # resumes at 3 + max(2, 3)
    with pytest.raises(ValueError, match="more images"):
        text_encoder.multimodal_position_ids(ids, torch.ones_like(ids), [], IMAGE_PAD_ID)
    with pytest.raises(ValueError, match="needs 8 consecutive"):
        text_encoder.multimodal_position_ids(ids, torch.ones_like(ids), [(1, 4, 8)], IMAGE_PAD_ID)
    with pytest.raises(ValueError, match="lists 2 images but the prompts hold 1"):
        text_encoder.multimodal_position_ids(ids, torch.ones_like(ids), [(1, 4, 6)] * 2, IMAGE_PAD_ID)


def test_image_count_must_match_placeholders(reference, tower):
    model, root = reference
    tok = tokenizer.load(root / "tokenizer")
    ours = text_encoder.load(root / "text_encoder")
    texts, pixels, grids = edit_inputs(tok, ["edit"], [random_image(60, 60)])
    features = tower(pixels, grids)
    with pytest.raises(ValueError, match=r"holds 1 <\|image_pad\|> token\(s\) but 2 image"):
        prompts.encode_prompts(
            tok,
            ours,
            texts,
            prompts.EDIT_TEMPLATE,
            64,
            None,
            image_features=torch.cat([features, features]),
            image_grid_thw=grids * 2,
        )


class StubProcessor:
    """Stands in for Qwen2VLProcessor (which needs torchvision) inside diffusers' own _get_qwen_prompt_embeds:
    transformers' tokenizer and PIL image processor, the <|image_pad|> expansion, and - like the real
    processor - an `mm_token_type_ids` entry, which diffusers then does not pass on."""

    def __init__(self, hf_tokenizer, **limits):
        self.tokenizer, self.image_processor = hf_tokenizer, Qwen2VLImageProcessorPil(**limits)

    def __call__(self, text, images, padding, return_tensors):
        from transformers import BatchFeature

        image_inputs = self.image_processor(images=images, return_tensors="pt")
        counts = [int(g.prod()) // 4 for g in image_inputs["image_grid_thw"]]
        expanded = []
        for t in text:
            parts = t.split("<|image_pad|>")
            expanded.append(parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:])))
        out = self.tokenizer(expanded, padding=True, return_tensors="pt")
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_PAD_ID).int()
        return BatchFeature({**out, **image_inputs})


def test_diffusers_drops_mm_token_type_ids_and_encodes_images_with_sequential_positions(reference):
    """diffusers 0.42.1's Edit pipelines call the text encoder without `mm_token_type_ids`; with
    transformers 5.x that silently gives image tokens text positions (diffusers issue #14194).
    This project follows the model as trained (3-D positions); image_positions="sequential"
    reproduces diffusers."""
    model, root = reference
    tok = tokenizer.load(root / "tokenizer")
    ours = text_encoder.load(root / "text_encoder")
    tower = vision.load(root / "text_encoder")
    pipe = QwenImageEditPlusPipeline(
        scheduler=None,
        vae=None,
        text_encoder=model,
        transformer=None,
        tokenizer=Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
        processor=StubProcessor(Qwen2Tokenizer.from_pretrained(root / "tokenizer")),
    )
    pictures = [random_image(250, 180, seed=11), random_image(100, 200, seed=12)]
    prompt = "Replace the background of picture 1 with picture 2"
    with torch.no_grad():
        diffusers_embeds, _ = pipe._get_qwen_prompt_embeds(prompt, pictures, device=torch.device("cpu"))
    texts, pixels, grids = edit_inputs(tok, [prompt], pictures)
    with torch.no_grad():
        features = tower(pixels, grids)
    encode = lambda positions: prompts.encode_prompts(
        tok,
        ours,
        texts,
        prompts.EDIT_TEMPLATE,
        prompts.EDIT_PREFIX_TOKENS,
        None,
        image_features=features,
        image_grid_thw=grids,
        image_positions=positions,
    )[0]
    sequential, trained = encode("sequential"), encode("3d")
    assert max_rel_err(sequential, diffusers_embeds) <= TOL  # diffusers = sequential positions
    assert max_rel_err(trained, diffusers_embeds) > 1e-2  # and that differs from the model as trained


# ---------------------------------------------------------------------------------------------
# bf16 on a GPU (make cuda-check)
# ---------------------------------------------------------------------------------------------


def full_width_tower_parity(tmp_path, device, depth=4):
    """The official tower's width (1280, 16 heads, SwiGLU 3420, merger to 3584) with `depth` blocks
    (the last full-attention), a 1248x832 image (the size Qwen-Image-Edit feeds it: 2646 patches,
    windows of 8x8), saved in fp32 and loaded in bf16 by both; fp32 as the yardstick.
    Returns (ours vs transformers-bf16, ours vs fp32, transformers vs fp32), max rel errors."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from conftest import randomize_

    text = dict(
        vocab_size=151680,
        hidden_size=3584,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    vis = dict(
        depth=depth,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[depth - 1],
    )
    ref = randomize_(
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vis)).eval(),
        seed=0,
    )
    pixels, grid = images.preprocess(random_image(832, 1248, seed=1))
    with torch.no_grad():
        truth = ref.model.visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
    ref.save_pretrained(tmp_path / "te")
    del ref
    ref16 = (
        Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "te", dtype=torch.bfloat16)
        .to(device)
        .eval()
    )
    with torch.no_grad():
        expected = ref16.model.visual(
            pixels.to(device), grid_thw=torch.tensor([grid], device=device)
        ).pooler_output
    del ref16
    ours = vision.load(tmp_path / "te", device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        got = ours(pixels.to(device), [grid])
    truth, expected, got = truth.double(), expected.double().cpu(), got.double().cpu()
    return max_rel_err(got, expected), max_rel_err(got, truth), max_rel_err(expected, truth)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make cuda-check)")
def test_full_width_vision_tower_bf16_on_cuda(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    err_vs_ref, err_ours, err_ref = full_width_tower_parity(tmp_path, "cuda")
    print(
        f"\nvision tower bf16 cuda, full width, 4 blocks, 1248x832 image: ours vs transformers-bf16 {err_vs_ref:.2e}; "
        f"vs fp32: ours {err_ours:.2e}, transformers {err_ref:.2e}"
    )
    assert err_vs_ref <= 2e-2
    assert err_ours <= 1.25 * err_ref + 1e-3

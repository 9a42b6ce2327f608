"""fp8.py and the converter's fp8 paths: ComfyUI's fp8 files, dequantisation by the reference
formula, quantisation error, memory, and the errors that name a bad tensor. Fast, CPU only.

The model is tiny but has head_dim 128 like the real one, so the converter infers its config
from the tensor shapes exactly as it does for a downloaded ComfyUI file."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import weights_convert
from conftest import max_rel_err, randomize_
from qwenimage_minimal import fp8, lora, mmdit, pipeline, weights, writing

CONFIG = mmdit.MMDiTConfig(
    num_layers=2, num_attention_heads=2, attention_head_dim=128, joint_attention_dim=64
)
E4M3 = torch.float8_e4m3fn
COMFY = "model.diffusion_model."


def e4m3fn_value(byte: int) -> float:
    """float8_e4m3fn by its definition: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
    is subnormal (2^-6 * m/8); S.1111.111 is NaN and has no place here."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0:
        return sign * 2.0**-6 * mantissa / 8
    return sign * 2.0 ** (exponent - 7) * (1 + mantissa / 8)


E4M3_VALUES = torch.tensor(
    [e4m3fn_value(b) if b & 0x7F != 0x7F else float("nan") for b in range(256)], dtype=torch.float64
)


def reference_dequantize(q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's CUDA kernel (comfy-kitchen dequantize_fp8_tensor_kernel): each value as float,
    times the fp32 scale in fp32, rounded once to dtype. Decoded from the bits, product in float64
    (exact for 4 x 24 significant bits) rounded to fp32: that is the fp32 multiplication."""
    values = E4M3_VALUES[q.view(torch.uint8).long()]
    product = (values * torch.tensor(scale, dtype=torch.float32).double()).to(torch.float32)
    return product.to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (fp8 tensors have no == in torch)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 12, 64, generator=g),
        torch.randn(1, 5, CONFIG.joint_attention_dim, generator=g),
        None,
        torch.tensor([0.4]),
        [(1, 3, 4)],
    )


def run(model):
    with torch.no_grad():
        return model(*inputs())


def nbytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def write_folder(folder, state, config=CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    writing.write_safetensors(
        folder / "diffusion_pytorch_model.safetensors",
        [(k, tuple(v.shape), v.dtype) for k, v in state.items()],
        state.values(),
    )
    writing.write_json(folder / "config.json", config.to_json())
    return folder


@pytest.fixture(scope="module")
def model():
    """A random bf16 MMDiT (Gaussian weights, so each matrix has a few large entries, as trained ones do)."""
    return randomize_(mmdit.MMDiT(CONFIG), seed=3).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def bf16_folder(model, tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("fp8") / "bf16", model.state_dict())


def comfy_scaled_file(path, state, fp8_layers, prefix=COMFY, scale_input=()):
    """A scaled-fp8 file laid out as ComfyUI's: per fp8 layer q = fp8(W * (1/s)) with s = max|W| / 448
    (comfy-kitchen's eager quantize), `scale_weight` F32 [], optional `scale_input` F32 [] = 1, and the
    `scaled_fp8` marker (an empty F8_E4M3 tensor) at the key prefix."""
    tensors = {}
    for name, value in state.items():
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and layer in fp8_layers:
            s = value.float().abs().max() / 448
            tensors[prefix + name] = torch.clamp(value * (1.0 / s).to(value.dtype), -448, 448).to(E4M3)
            tensors[prefix + layer + ".scale_weight"] = s.reshape(())
            if layer in scale_input:
                tensors[prefix + layer + ".scale_input"] = torch.ones(())
        else:
            tensors[prefix + name] = value.contiguous()
    tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=E4M3)
    save_file(tensors, path)
    return tensors


# --- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_is_the_reference_formula_bit_for_bit(dtype):
    """Every finite e4m3fn value, scaled and unscaled, against the formula written from its definition."""
    q = (
        torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
        .view(E4M3)
        .reshape(2, 127)
    )
    for scale in (1.0, 0.0123456789, 3.3e-5):
        ours = fp8.dequantize(q, torch.tensor(scale), dtype)
        assert ours.dtype == dtype and torch.equal(ours, reference_dequantize(q, scale, dtype)), scale
    # ComfyUI's eager backend and its older comfy/ops.py round the scale to dtype first: not bit-equal in
    # bf16, but at most one bf16 step apart (2^-7 relative at the bottom of a binade)
    s = torch.tensor(0.0123456789)
    legacy = q.to(dtype) * s.to(dtype)
    ours = fp8.dequantize(q, s, dtype)
    gap = ((legacy.double() - ours.double()).abs() / ours.double().abs().clamp_min(1e-30)).max().item()
    print(f"\n{str(dtype)[6:]}: legacy q.to(dtype) * s.to(dtype) differs by up to {gap:.2e} (relative)")
    assert gap <= 2**-7
    if dtype == torch.bfloat16:
        assert gap > 0


def test_fp8_linear_is_a_linear_with_the_dequantised_weight():
    linear = randomize_(torch.nn.Linear(96, 40), seed=1)
    layer = fp8.FP8Linear.from_linear(linear)
    assert layer.weight.dtype == E4M3 and not layer.weight.requires_grad
    assert layer.scale_weight.dtype == torch.float32 and layer.scale_weight.shape == ()
    assert layer.scale_weight.item() == pytest.approx(linear.weight.abs().max().item() / 448, rel=1e-6)
    assert layer.in_features == 96 and layer.out_features == 40
    x = torch.randn(3, 7, 96)
    expected = torch.nn.functional.linear(
        x, reference_dequantize(layer.weight, layer.scale_weight.item(), torch.float32), linear.bias
    )
    assert torch.equal(layer(x), expected)


# --- ComfyUI files ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [COMFY, ""])
def test_comfyui_scaled_file_converts_loads_and_matches_its_dequantised_weights(
    model, tmp_path, prefix, capsys
):
    state = model.state_dict()
    blocks = fp8.block_linears(model)
    fp8_layers = set(blocks) - {"transformer_blocks.1.img_mod.1"} | {
        "txt_in"
    }  # a bf16 one in, an fp8 one out
    file = comfy_scaled_file(
        tmp_path / "qwen_image_fp8_e4m3fn_scaled.safetensors",
        state,
        fp8_layers,
        prefix,
        scale_input={"transformer_blocks.0.attn.to_q", "transformer_blocks.1.txt_mlp.net.2"},
    )
    summary = weights_convert.convert(
        tmp_path / "qwen_image_fp8_e4m3fn_scaled.safetensors", tmp_path / "transformer"
    )
    printed = capsys.readouterr().out
    # every tensor accounted for: written, or dropped with its reason in the summary and the printout
    assert summary["tensors_read"] == len(file) == summary["tensors_written"] + len(summary["dropped"])
    assert sorted(summary["dropped"]) == sorted(
        prefix + n
        for n in (
            "scaled_fp8",
            "transformer_blocks.0.attn.to_q.scale_input",
            "transformer_blocks.1.txt_mlp.net.2.scale_input",
        )
    )
    assert "scaled-fp8 marker" in printed and "activation scale" in printed
    assert summary["fp8_weights"] == summary["scales_written"] == len(fp8_layers)
    assert fp8.is_fp8_folder(tmp_path / "transformer")

    loaded = fp8.load_transformer(tmp_path / "transformer")
    fp8_modules = {n for n, m in loaded.named_modules() if isinstance(m, fp8.FP8Linear)}
    assert fp8_modules == fp8_layers - {"txt_in"}  # txt_in: dequantised at load
    for name in fp8_modules:  # the file's bytes, the file's scale
        layer = loaded.get_submodule(name)
        assert same(layer.weight, file[prefix + name + ".weight"]), name
        assert torch.equal(layer.scale_weight, file[prefix + name + ".scale_weight"]), name
    assert loaded.txt_in.weight.dtype == torch.bfloat16 and loaded.img_in.weight.dtype == torch.bfloat16

    # a plain bf16 MMDiT holding the dequantised weights computes the very same numbers
    reference = mmdit.MMDiT(CONFIG).to(torch.bfloat16).eval()
    dequantised = {}
    for name in state:
        stored = file[prefix + name]
        layer = name[: -len(".weight")]
        scale = file.get(prefix + layer + ".scale_weight") if name.endswith(".weight") else None
        dequantised[name] = (
            stored if scale is None else reference_dequantize(stored, scale.item(), torch.bfloat16)
        )
    reference.load_state_dict(dequantised)
    assert torch.equal(run(loaded), run(reference))
    assert torch.equal(loaded.txt_in.weight, dequantised["txt_in.weight"])


def test_plain_fp8_file_without_scales(model, tmp_path):
    """qwen_image_fp8_e4m3fn.safetensors: weights cast to fp8, no scales, no marker."""
    state = {k: (v.to(E4M3) if v.ndim == 2 else v) for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "qwen_image_fp8_e4m3fn.safetensors")
    summary = weights_convert.convert(
        tmp_path / "qwen_image_fp8_e4m3fn.safetensors", tmp_path / "transformer"
    )
    assert summary["scales_written"] == 0 and not summary["dropped"]
    loaded = fp8.load_transformer(tmp_path / "transformer")
    layer = loaded.transformer_blocks[0].attn.to_q
    assert isinstance(layer, fp8.FP8Linear) and layer.scale_weight.item() == 1.0
    assert "transformer_blocks.0.attn.to_q.scale_weight" not in loaded.state_dict()  # the file's keys exactly
    assert loaded.proj_out.weight.dtype == torch.bfloat16
    # pipeline.load_transformer (so from_pretrained too) recognises an fp8 folder and keeps its weights in fp8
    auto = pipeline.load_transformer(tmp_path / "transformer")
    assert isinstance(auto.transformer_blocks[0].attn.to_q, fp8.FP8Linear) and torch.equal(
        run(auto), run(loaded)
    )
    # the generic loader refuses fp8 tensors without a compute dtype, and upcasts them exactly with one
    build = lambda: mmdit.MMDiT(mmdit.config_from_folder(tmp_path / "transformer"))
    with pytest.raises(weights.CheckpointError, match="float8_e4m3fn.*fp8.load_transformer"):
        weights.load_weights(build, tmp_path / "transformer", mmdit.WEIGHTS_STEM)
    plain = weights.load_weights(build, tmp_path / "transformer", mmdit.WEIGHTS_STEM, dtype=torch.bfloat16)
    assert torch.equal(run(plain), run(loaded))


# --- quantising -----------------------------------------------------------------------------------


def test_quantize_error_is_small_measured_and_not_zero(model):
    """e4m3 keeps 3 mantissa bits: each weight moves by at most 2^-4 of itself (2^-4.6 on average for
    Gaussian weights). One layer's output is a sum of many such errors of both signs, so its relative
    RMS error is about that size; through the blocks the output moves by less than 2^-4 of its largest
    value. Computed in fp32 so that only the quantisation shows."""
    reference = copy.deepcopy(model).float()
    quantised = fp8.quantize(copy.deepcopy(reference))
    layer, q = reference.transformer_blocks[0].img_mlp.net[2], quantised.transformer_blocks[0].img_mlp.net[2]
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_layer = ((q(x) - layer(x)).norm() / layer(x).norm()).item()
    whole = max_rel_err(run(quantised), run(reference))
    print(
        f"\nfp8 quantisation, relative error: one layer {one_layer:.4f} (RMS), whole model {whole:.4f} (max)"
    )
    assert 1e-3 < one_layer < 2**-4
    assert 1e-4 < whole < 2**-4


def test_fp8_weights_take_half_the_bytes(model):
    quantised = fp8.quantize(copy.deepcopy(model))
    layers = fp8.block_linears(model)
    for name in layers:
        w8, w16 = quantised.get_submodule(name).weight, model.get_submodule(name).weight
        assert w8.numel() * w8.element_size() * 2 == w16.numel() * w16.element_size()
    before, after = nbytes(model), nbytes(quantised)
    print(f"\ntiny: bf16 {before / 2**20:.2f} MiB -> fp8 {after / 2**20:.2f} MiB ({after / before:.3f})")
    assert 0.5 < after / before < 0.55  # + scales, biases, norms and the layers outside the blocks in bf16
    official_bf16 = weights.build_on_meta(lambda: mmdit.MMDiT(mmdit.MMDiTConfig())).to(torch.bfloat16)
    before = nbytes(official_bf16)
    after = nbytes(fp8.quantize(official_bf16))  # quantize works on meta too
    print(f"official: bf16 {before / 1e9:.2f} GB -> fp8 {after / 1e9:.2f} GB ({after / before:.4f})")
    assert 0.5 < after / before < 0.503


def test_to_dtype_moves_only_the_bias():
    layer = fp8.FP8Linear.from_linear(torch.nn.Linear(32, 16)).to(torch.bfloat16)
    assert layer.weight.dtype == E4M3 and layer.scale_weight.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and not layer.weight.requires_grad


# --- the converter ------------------------------------------------------------------------------


def test_convert_to_fp8_and_back(model, bf16_folder, tmp_path):
    assert weights_convert.main([str(bf16_folder), str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    assert fp8.is_fp8_folder(tmp_path / "fp8") and not fp8.is_fp8_folder(bf16_folder)
    loaded = fp8.load_transformer(tmp_path / "fp8")
    quantised = fp8.quantize(copy.deepcopy(model))  # the same per-tensor quantisation
    assert loaded.state_dict().keys() == quantised.state_dict().keys()
    for k, v in quantised.state_dict().items():
        assert same(loaded.state_dict()[k], v), k
    assert torch.equal(run(loaded), run(quantised))

    # folder -> ComfyUI file (with the marker) -> folder: bit for bit
    file = tmp_path / "qwen_image_fp8_scaled.safetensors"
    weights_convert.convert(tmp_path / "fp8", file, prefix=COMFY)
    written = load_file(file)
    assert written[COMFY + "scaled_fp8"].dtype == E4M3 and written[COMFY + "scaled_fp8"].numel() == 2
    weights_convert.convert(file, tmp_path / "back")
    back = dict(weights.iter_tensors(weights.weight_files(tmp_path / "back", mmdit.WEIGHTS_STEM)))
    first = dict(weights.iter_tensors(weights.weight_files(tmp_path / "fp8", mmdit.WEIGHTS_STEM)))
    assert back.keys() == first.keys()
    assert all(same(back[k], first[k]) for k in first)

    # --dtype bf16 dequantises: a folder the plain loader (and diffusers) reads, computing the same numbers
    summary = weights_convert.convert(tmp_path / "fp8", tmp_path / "bf16", dtype=torch.bfloat16)
    assert len(summary["dequantized"]) == len(fp8.block_linears(model)) and summary["dtypes"] == ["bfloat16"]
    plain = mmdit.load(tmp_path / "bf16")
    layer = loaded.transformer_blocks[1].txt_mod[1]
    assert torch.equal(
        plain.transformer_blocks[1].txt_mod[1].weight,
        reference_dequantize(layer.weight, layer.scale_weight.item(), torch.bfloat16),
    )
    assert torch.equal(run(plain), run(loaded))


def test_merging_a_lora_into_fp8_weights_requantises_them(model, bf16_folder, tmp_path):
    weights_convert.convert(bf16_folder, tmp_path / "fp8", dtype=fp8.FP8)
    fp8_model = fp8.load_transformer(tmp_path / "fp8")
    with pytest.raises(ValueError, match="fp8 weights.*--merge-lora"):
        lora.load_adapter(fp8_model, {}, "x")
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 256, generator=g) * 0.05, torch.randn(256, 4, generator=g) * 0.05
    lora.write_lora(tmp_path / "l.safetensors", {"transformer_blocks.0.attn.to_q": (A, B, 4.0)})
    weights_convert.convert(
        tmp_path / "fp8", tmp_path / "merged", merge_lora=[(tmp_path / "l.safetensors", 1.0)]
    )
    merged = fp8.load_transformer(tmp_path / "merged")
    before, after = fp8_model.transformer_blocks[0].attn.to_q, merged.transformer_blocks[0].attn.to_q
    expected = fp8.dequantize(before.weight, before.scale_weight, torch.float32) + B @ A
    got = fp8.dequantize(after.weight, after.scale_weight, torch.float32)
    assert after.weight.dtype == E4M3 and max_rel_err(got, expected) <= 2**-4
    assert same(
        merged.transformer_blocks[0].attn.to_k.weight, fp8_model.transformer_blocks[0].attn.to_k.weight
    )


# --- bad input ----------------------------------------------------------------------------------

SCALE = "transformer_blocks.0.attn.to_k.scale_weight"


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda t: t.pop("transformer_blocks.0.attn.to_k.weight"),
            f"'{SCALE}' scales the weight .* which is absent",
        ),
        (
            lambda t: t.update({SCALE: torch.ones(2)}),
            f"'{SCALE}' is float32 \\[2\\]; a per-tensor scale is one",
        ),
        (
            lambda t: t.update(
                {"transformer_blocks.0.attn.to_k.weight": torch.zeros(256, 256, dtype=torch.bfloat16)}
            ),
            f"'{SCALE}' scales the weight .* which is stored in bfloat16",
        ),
        (
            lambda t: t.update({"transformer_blocks.0.attn.norm_q.scale_weight": torch.ones(())}),
            "'transformer_blocks.0.attn.norm_q.scale_weight' scales 'transformer_blocks.0.attn.norm_q', which is not a "
            "Linear layer",
        ),
    ],
)
def test_bad_scales_are_named(model, tmp_path, damage, message):
    tensors = comfy_scaled_file(
        tmp_path / "good.safetensors", model.state_dict(), {"transformer_blocks.0.attn.to_k"}, prefix=""
    )
    damage(tensors)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(weights.CheckpointError, match=message):
        weights_convert.convert(tmp_path / "bad.safetensors", tmp_path / "out", config_path=None)
    assert not (tmp_path / "out").exists()
    tensors.pop("scaled_fp8")
    write_folder(tmp_path / "folder", tensors)  # the loader checks the same
    with pytest.raises(weights.CheckpointError, match=message):
        fp8.load_transformer(tmp_path / "folder")


def test_bad_scale_values_and_wrong_uses(model, tmp_path):
    tensors = comfy_scaled_file(
        tmp_path / "f.safetensors", model.state_dict(), {"transformer_blocks.0.attn.to_k"}, prefix=""
    )
    tensors.pop("scaled_fp8")
    tensors[SCALE] = torch.tensor(float("nan"))
    write_folder(tmp_path / "nan", tensors)
    with pytest.raises(weights.CheckpointError, match=f"'{SCALE}' is nan; a scale is a positive number"):
        fp8.load_transformer(tmp_path / "nan")
    build = lambda: mmdit.MMDiT(
        mmdit.config_from_folder(tmp_path / "nan")
    )  # the generic loader names the fix
    with pytest.raises(
        weights.CheckpointError, match="scaled-fp8 checkpoint: load it with .*fp8.load_transformer"
    ):
        weights.load_weights(build, tmp_path / "nan", mmdit.WEIGHTS_STEM, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="compute dtype"):
        fp8.load_transformer(tmp_path / "nan", dtype=E4M3)
    with pytest.raises(ValueError, match="--component transformer only"):
        weights_convert.convert(tmp_path / "f.safetensors", tmp_path / "out", component="vae", dtype=fp8.FP8)

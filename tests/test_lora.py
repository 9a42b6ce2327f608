"""lora.py against diffusers' load_lora_weights (with PEFT) on the tiny official-layout checkpoint, fp32 CPU:
every file format in its real key layout, rank 4 with an alpha that differs from the rank."""

import json

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import save_file

from conftest import max_rel_err
from qwenimage_minimal import lora, pipeline, sizes, weights

TOL = 1e-5
RANK, ALPHA = 4, 2.0
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return sizes.write_checkpoint(tmp_path_factory.mktemp("lora") / "tiny", "tiny")


def reference(root):
    ref = QwenImagePipeline.from_pretrained(root)
    ref.set_progress_bar_config(disable=True)
    return ref


def random_adapters(model, modules_suffixes, seed=0, rank=RANK):
    """{module: (A, B)} with random values for every Linear ending in one of the suffixes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith(s) for s in modules_suffixes):
            out[name] = (
                0.2 * torch.randn(rank, m.in_features, generator=g),
                0.2 * torch.randn(m.out_features, rank, generator=g),
            )
    return out


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 4 * 6, 64, generator=g)
    txt = torch.randn(2, 7, 64, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return img, txt, mask, torch.tensor([0.8, 0.3]), [(1, 4, 6)]


def our_output(dit):
    img, txt, mask, sigma, shapes = inputs()
    with torch.no_grad():
        return dit(img, txt, mask, sigma, shapes)


def both_outputs(ours_dit, ref_dit):
    img, txt, mask, sigma, shapes = inputs()
    with torch.no_grad():
        return our_output(ours_dit), ref_dit(img, txt, mask, sigma, [shapes] * 2).sample


FORMATS = {  # name: module name -> (A key, B key, alpha key or None)
    "comfyui": lambda m: (
        f"diffusion_model.{m}.lora_A.weight",
        f"diffusion_model.{m}.lora_B.weight",
        f"diffusion_model.{m}.alpha",
    ),
    "comfyui-up-down": lambda m: (
        f"diffusion_model.{m}.lora_down.weight",
        f"diffusion_model.{m}.lora_up.weight",
        f"diffusion_model.{m}.alpha",
    ),
    "kohya": lambda m: (
        f"lora_unet_{m.replace('.', '_')}.lora_down.weight",
        f"lora_unet_{m.replace('.', '_')}.lora_up.weight",
        f"lora_unet_{m.replace('.', '_')}.alpha",
    ),
    "diffsynth": lambda m: (f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight", None),
    "lightning": lambda m: (f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"),
}
ALL_LINEAR = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
    "proj_out",
    "norm_out.linear",
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_file_format_matches_diffusers(root, tmp_path, fmt):
    """A file in the format's real key layout (every Linear of the blocks plus top-level ones, so the
    kohya names must map back unambiguously: add_k_proj, img_mlp_net_0_proj, norm_out_linear)."""
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    adapters = random_adapters(ours.transformer, ALL_LINEAR)
    tensors = {}
    for m, (A, B) in adapters.items():
        a_key, b_key, alpha_key = FORMATS[fmt](m)
        tensors[a_key], tensors[b_key] = A, B
        if alpha_key:
            tensors[alpha_key] = torch.tensor(ALPHA)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    before, _ = both_outputs(ours.transformer, reference(root).transformer)

    ours.load_lora_weights(path)
    ref = reference(root)
    ref.load_lora_weights(path)
    got, expected = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(got, expected) <= TOL
    assert max_rel_err(got, before) > 1e-3  # the LoRA really changed the output
    scaling = {layer.scaling["default_0"] for layer in lora.lora_layers(ours.transformer).values()}
    assert scaling == ({ALPHA / RANK} if FORMATS[fmt]("x")[2] else {1.0})


def save_with_diffusers(root, path, seed=0):
    """A LoRA made the way the DreamBooth script makes one: PEFT's add_adapter, saved by save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = reference(root)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    ref.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    QwenImagePipeline.save_lora_weights(
        path,
        transformer_lora_layers=get_peft_model_state_dict(ref.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return ref


def test_a_lora_saved_by_diffusers_loads_in_ours(root, tmp_path):
    ref = save_with_diffusers(root, tmp_path)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = json.loads(weights.SafetensorsFile(path).metadata["lora_adapter_metadata"])
    assert (
        meta["transformer.lora_alpha"] == ALPHA and meta["transformer.r"] == RANK
    )  # alpha lives in the header
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    ours.load_lora_weights(path)
    got, expected = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(got, expected) <= TOL
    # and the whole pipeline: final latents with true CFG
    kwargs = dict(
        prompt="a cat",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=64,
        width=96,
        num_inference_steps=3,
        output_type="latent",
    )
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
    assert max_rel_err(got, expected) <= TOL


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_a_lora_saved_by_ours_loads_in_diffusers(root, tmp_path, fmt):
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    adapters = {
        m: (A, B, ALPHA) for m, (A, B) in random_adapters(ours.transformer, ATTENTION, seed=3).items()
    }
    lora.write_lora(tmp_path / "ours.safetensors", adapters, format=fmt)
    ours.load_lora_weights(tmp_path / "ours.safetensors")
    ref = reference(root)
    ref.load_lora_weights(tmp_path / "ours.safetensors")
    got, expected = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(got, expected) <= TOL
    back, _ = lora.read_lora(tmp_path / "ours.safetensors", ours.transformer)
    if fmt == "comfyui":  # alpha per layer, as written
        assert all(
            torch.equal(back[m][0], A) and torch.equal(back[m][1], B) and back[m][2] == ALPHA
            for m, (A, B, _) in adapters.items()
        )
    else:  # alpha / r folded into B, lora_alpha = r: the same update
        assert all(
            torch.equal(back[m][0], A) and torch.equal(back[m][1], B * (ALPHA / RANK)) and back[m][2] == RANK
            for m, (A, B, _) in adapters.items()
        )


def test_transformer_prefix_with_alpha_tensors(root, tmp_path):
    """diffusers 0.42.1 refuses transformer.-prefixed lora_A/lora_B names plus .alpha tensors
    (NoMatchingPeftModuleError), while it honours the same alpha behind diffusion_model. (the
    other test). Ours honours alpha in both, which is what the file means: the two give the same output."""
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    adapters = random_adapters(ours.transformer, ATTENTION, seed=5)
    plain = {}
    for m, (A, B) in adapters.items():
        plain |= {
            f"transformer.{m}.lora_A.weight": A,
            f"transformer.{m}.lora_B.weight": B,
            f"transformer.{m}.alpha": torch.tensor(ALPHA),
        }
    save_file(plain, tmp_path / "t.safetensors")
    save_file(
        {k.replace("transformer.", "diffusion_model.", 1): v for k, v in plain.items()},
        tmp_path / "d.safetensors",
    )
    ref = reference(root)
    with pytest.raises(Exception, match="(?i)no.*match|target modules|peft"):
        ref.load_lora_weights(tmp_path / "t.safetensors")
    ref = reference(root)
    ref.load_lora_weights(tmp_path / "d.safetensors")
    ours.load_lora_weights(tmp_path / "t.safetensors")
    got, expected = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(got, expected) <= TOL


def test_two_adapters_scales_fuse_unfuse(root, tmp_path):
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    for i, seed in enumerate((7, 8)):
        adapters = {
            m: (A, B, ALPHA) for m, (A, B) in random_adapters(ours.transformer, ATTENTION, seed=seed).items()
        }
        lora.write_lora(tmp_path / f"{i}.safetensors", adapters)
    base = {k: v.clone() for k, v in ours.transformer.state_dict().items()}
    ours.load_lora_weights(tmp_path / "0.safetensors", adapter_name="style")
    ours.load_lora_weights(tmp_path / "1.safetensors", adapter_name="detail")
    ours.set_adapters(["style", "detail"], [0.7, -0.4])
    ref = reference(root)
    ref.load_lora_weights(tmp_path / "0.safetensors", adapter_name="style")
    ref.load_lora_weights(tmp_path / "1.safetensors", adapter_name="detail")
    ref.set_adapters(["style", "detail"], [0.7, -0.4])
    unfused, expected = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(unfused, expected) <= TOL
    ours.fuse_lora()
    fused, _ = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(fused, unfused) <= TOL
    ours.unfuse_lora()
    restored = ours.transformer.state_dict()
    assert all(torch.equal(restored[k], base[k]) for k in base)  # bit-exact
    ours.fuse_lora()
    ours.unload_lora_weights()  # as in diffusers: a fused LoRA stays in the weights
    baked = ours.transformer.state_dict()
    assert baked.keys() == base.keys() and max_rel_err(our_output(ours.transformer), fused) <= TOL
    assert not all(torch.equal(baked[k], base[k]) for k in base)
    assert not lora.lora_layers(ours.transformer)


def test_lightning_eight_steps_matches_the_lightning_readme(root, tmp_path):
    """A Lightning-format LoRA, 8 steps, true_cfg_scale 1, and the scheduler the Lightning README builds
    (constant shift ln 3, no terminal stretch) on both sides."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from qwenimage_minimal import scheduler

    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    tensors = {}
    for m, (A, B) in random_adapters(ours.transformer, ALL_LINEAR[:14], seed=11).items():
        tensors |= {f"{m}.lora_down.weight": A, f"{m}.lora_up.weight": B, f"{m}.alpha": torch.tensor(ALPHA)}
    save_file(tensors, tmp_path / "Qwen-Image-Lightning-8steps.safetensors")
    ours.load_lora_weights(tmp_path / "Qwen-Image-Lightning-8steps.safetensors")
    ours.scheduler = scheduler.FlowMatchEulerScheduler(scheduler.lightning_config())
    ref = reference(root)
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {
            "base_image_seq_len": 256,
            "base_shift": math.log(3),
            "invert_sigmas": False,
            "max_image_seq_len": 8192,
            "max_shift": math.log(3),
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "shift_terminal": None,
            "stochastic_sampling": False,
            "time_shift_type": "exponential",
            "use_beta_sigmas": False,
            "use_dynamic_shifting": True,
            "use_exponential_sigmas": False,
            "use_karras_sigmas": False,
        }
    )
    ref.load_lora_weights(tmp_path / "Qwen-Image-Lightning-8steps.safetensors")
    kwargs = dict(
        prompt="a cat",
        negative_prompt=" ",
        true_cfg_scale=1.0,
        height=64,
        width=96,
        num_inference_steps=8,
        output_type="latent",
    )
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
    assert max_rel_err(got, expected) <= TOL


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 96),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
            },
            "made for a model of another width",
        ),
        (
            lambda d: {
                "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 64),
                "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(192, 4),
            },
            "It is a LoRA for another model",
        ),
        (
            lambda d: {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 64)},
            "adapts the text encoder",
        ),
        (
            lambda d: {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64)},
            "has no up \\(B\\) matrix",
        ),
        (
            lambda d: {
                "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
                "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
                "diffusion_model.transformer_blocks.0.attn.to_q.dora_scale": torch.zeros(64),
            },
            "is not part of a ComfyUI / ai-toolkit LoRA",
        ),
    ],
)
def test_bad_lora_files_apply_nothing(root, tmp_path, make, message):
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    tensors = make(None)
    # one good module first, so that a half-applied load would show
    good = random_adapters(ours.transformer, ("transformer_blocks.0.attn.to_k",))  # sorts before the bad one
    key_prefix = (
        next(iter(tensors)).split("transformer_blocks")[0]
        if "transformer_blocks" in next(iter(tensors))
        else ""
    )
    if key_prefix:
        for m, (A, B) in good.items():
            tensors |= {f"{key_prefix}{m}.lora_A.weight": A, f"{key_prefix}{m}.lora_B.weight": B}
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(weights.CheckpointError, match=message):
        ours.load_lora_weights(tmp_path / "bad.safetensors")
    assert not lora.lora_layers(ours.transformer)


def test_truncated_file_and_bad_scale(root, tmp_path):
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    adapters = {m: (A, B, ALPHA) for m, (A, B) in random_adapters(ours.transformer, ATTENTION).items()}
    lora.write_lora(tmp_path / "l.safetensors", adapters)
    data = (tmp_path / "l.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        ours.load_lora_weights(tmp_path / "cut.safetensors")
    for scale in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            ours.load_lora_weights(tmp_path / "l.safetensors", scale=scale)
    assert not lora.lora_layers(ours.transformer)
    ours.load_lora_weights(tmp_path / "l.safetensors", adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(tmp_path / "l.safetensors", adapter_name="x")


def test_training_adapter_starts_as_the_identity_and_lists_its_parameters(root):
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    before = our_output(ours.transformer)
    for preset, per_block in (
        ("diffusers", 4),
        ("attention", 8),
        ("all-linear-no-mod", 12),
        ("all-linear", 14),
    ):
        layers = lora.target_names(ours.transformer, preset)
        assert len(layers) == per_block * ours.transformer.config.num_layers, preset
    with pytest.raises(ValueError, match="adapter_name 'train' cannot name an adapter"):
        lora.add_adapter(ours.transformer, "train", "attention")
    names = lora.add_adapter(
        ours.transformer, "style", "attention", rank=8, alpha=16, generator=torch.Generator().manual_seed(0)
    )
    after = our_output(ours.transformer)
    assert torch.equal(after, before)  # B = 0: unchanged at step 0
    params = lora.trainable_parameters(ours.transformer)
    assert len(params) == 2 * len(names) and all(p.dtype == torch.float32 for p in params.values())
    assert all(".lora_A.style." in n or ".lora_B.style." in n for n in params)


def test_command_line_lora_and_lightning_scheduler(root, tmp_path):
    from PIL import Image

    from qwenimage_minimal import __main__ as cli
    from qwenimage_minimal import scheduler

    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    tensors = {}
    for m, (A, B) in random_adapters(ours.transformer, ATTENTION, seed=13).items():
        tensors |= {f"{m}.lora_down.weight": A, f"{m}.lora_up.weight": B, f"{m}.alpha": torch.tensor(ALPHA)}
    save_file(tensors, tmp_path / "light.safetensors")
    out = tmp_path / "cli.png"
    cli.main(
        [
            "generate",
            "--model",
            str(root),
            "--prompt",
            "a cat",
            "--height",
            "64",
            "--width",
            "96",
            "--steps",
            "4",
            "--cfg",
            "1",
            "--device",
            "cpu",
            "--lora",
            f"{tmp_path / 'light.safetensors'}:0.6",
            "--scheduler",
            "lightning",
            "--out",
            str(out),
        ]
    )
    ours.load_lora_weights(tmp_path / "light.safetensors", scale=0.6)
    ours.scheduler = scheduler.FlowMatchEulerScheduler(scheduler.lightning_config())
    expected = ours(
        prompt="a cat",
        negative_prompt=" ",
        true_cfg_scale=1.0,
        height=64,
        width=96,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    ).images[0]
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    with pytest.raises(SystemExit):
        cli.main(
            [
                "generate",
                "--model",
                str(root),
                "--prompt",
                "x",
                "--lora",
                f"{tmp_path / 'light.safetensors'}:nan",
            ]
        )


def test_converter_changes_formats_and_merges(root, tmp_path):
    import weights_convert

    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    tensors = {}
    for m, (A, B) in random_adapters(ours.transformer, ALL_LINEAR, seed=17).items():
        flat = f"lora_unet_{m.replace('.', '_')}"
        tensors |= {
            f"{flat}.lora_down.weight": A,
            f"{flat}.lora_up.weight": B,
            f"{flat}.alpha": torch.tensor(ALPHA),
        }
    save_file(tensors, tmp_path / "kohya.safetensors")
    weights_convert.convert(
        tmp_path / "kohya.safetensors",
        tmp_path / "comfy.safetensors",
        component="lora",
        layout="comfyui",
        log=lambda *a: None,
    )
    a, _ = lora.read_lora(tmp_path / "kohya.safetensors", ours.transformer)
    b, fmt = lora.read_lora(tmp_path / "comfy.safetensors", ours.transformer)
    assert fmt.startswith("ComfyUI") and a.keys() == b.keys()
    assert all(
        torch.equal(a[m][0], b[m][0]) and torch.equal(a[m][1], b[m][1]) and a[m][2] == b[m][2] for m in a
    )
    # merged into the transformer's files = loaded and fused
    weights_convert.convert(
        root / "transformer",
        tmp_path / "merged",
        merge_lora=[(tmp_path / "kohya.safetensors", 0.5)],
        log=lambda *a: None,
    )
    from qwenimage_minimal import mmdit

    merged = mmdit.load(tmp_path / "merged")
    ours.load_lora_weights(tmp_path / "kohya.safetensors", scale=0.5)
    assert max_rel_err(our_output(merged), our_output(ours.transformer)) <= TOL
    with pytest.raises(ValueError, match="--merge-lora merges into a transformer"):
        weights_convert.convert(
            root / "vae",
            tmp_path / "v",
            component="vae",
            merge_lora=[(tmp_path / "kohya.safetensors", 1.0)],
            log=lambda *a: None,
        )


def test_edit_pipeline_and_command_take_loras(tmp_path):
    """The Edit pipelines inherit the LoRA methods: the edit command with --lora gives a different
    picture than without, and the same as the Python API with the adapter loaded."""
    import numpy as np
    from PIL import Image

    from qwenimage_minimal import __main__ as cli

    root = sizes.write_checkpoint(tmp_path / "edit", "tiny", "QwenImageEditPlusPipeline")
    edit = pipeline.QwenImageEditPipeline.from_pretrained(root)
    adapters = {
        m: (A, B, ALPHA) for m, (A, B) in random_adapters(edit.transformer, ALL_LINEAR[:8], seed=19).items()
    }
    lora.write_lora(tmp_path / "e.safetensors", adapters)
    sizes.test_picture(48, 32).save(tmp_path / "in.png")
    args = [
        "edit",
        "--model",
        str(root),
        "--image",
        str(tmp_path / "in.png"),
        "--prompt",
        "blue",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "48",
        "--device",
        "cpu",
        "--cfg",
        "1",
    ]
    cli.main(args + ["--out", str(tmp_path / "plain.png")])
    cli.main(args + ["--out", str(tmp_path / "lora.png"), "--lora", str(tmp_path / "e.safetensors")])
    plain, with_lora = (np.asarray(Image.open(tmp_path / f), dtype=float) for f in ("plain.png", "lora.png"))
    assert np.abs(plain - with_lora).max() > 0
    edit.load_lora_weights(tmp_path / "e.safetensors")
    expected = edit(
        image=Image.open(tmp_path / "in.png"),
        prompt="blue",
        num_inference_steps=2,
        height=32,
        width=48,
        true_cfg_scale=1.0,
        negative_prompt=" ",
        generator=torch.Generator().manual_seed(0),
        progress=False,
    ).images[0]
    assert np.array_equal(np.asarray(expected, dtype=float), with_lora)


def test_peft_header_alpha_pattern_and_rslora_match_diffusers(root, tmp_path):
    """A diffusers-format file whose header gives one layer type its own alpha (alpha_pattern, a regex
    alternation as PEFT allows) and uses rsLoRA (alpha / sqrt(r))."""
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    tensors = {}
    for m, (A, B) in random_adapters(ours.transformer, ATTENTION, seed=23).items():
        tensors |= {f"transformer.{m}.lora_A.weight": A, f"transformer.{m}.lora_B.weight": B}
    meta = {
        "transformer.r": RANK,
        "transformer.lora_alpha": ALPHA,
        "transformer.use_rslora": True,
        "transformer.alpha_pattern": {"to_k|to_v": 16.0},
        "transformer.target_modules": list(ATTENTION),
    }
    save_file(tensors, tmp_path / "p.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    ours.load_lora_weights(tmp_path / "p.safetensors")
    ref = reference(root)
    ref.load_lora_weights(tmp_path / "p.safetensors")
    got, expected = both_outputs(ours.transformer, ref.transformer)
    assert max_rel_err(got, expected) <= TOL
    k = lora.lora_layers(ours.transformer)["transformer_blocks.0.attn.to_k"].scaling["default_0"]
    q = lora.lora_layers(ours.transformer)["transformer_blocks.0.attn.to_q"].scaling["default_0"]
    assert (k, q) == (16.0 / RANK**0.5, ALPHA / RANK**0.5)


def test_presets_do_not_adapt_adapters_and_alpha_sets_the_scale(root):
    ours = pipeline.QwenImagePipeline.from_pretrained(root)
    first = lora.add_adapter(ours.transformer, "one", "all-linear", rank=8, alpha=16, dropout=0.1)
    assert not any(m.training for m in ours.transformer.modules())  # eval model: dropout stays off
    second = lora.add_adapter(ours.transformer, "two", "all-linear", rank=8, alpha=16)
    assert first == second and len(first) == 14 * ours.transformer.config.num_layers
    assert {layer.scaling["one"] for layer in lora.lora_layers(ours.transformer).values()} == {2.0}

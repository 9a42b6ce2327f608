"""Assignment for lesson 01 (notebooks/01_text_encoder.ipynb, sections 3, 4 and 6): two steps of the text path,
the decoder's grouped-query causal attention and the cut from its hidden states to the prompt's rows.

Write the two functions below, then run `make grade LESSON=01`. The package computes the same inside
`qwenimage_minimal.text_encoder` (`Attention.forward`, with the mask `TextEncoder.forward` builds) and
`qwenimage_minimal.prompts.encode_prompts`: do not call them (the grader compares against them, and against
transformers' Qwen2.5-VL attention and diffusers' `QwenImagePipeline._get_qwen_prompt_embeds`).
"""

import torch


def grouped_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal self-attention of one Qwen2.5-VL decoder layer, with grouped-query heads and padding.

    q (B, Hq, S, D) query heads; k, v (B, Hkv, S, D) key/value heads, Hq a multiple of Hkv (28 and 4 in the
    real model); RoPE is already applied; float32 or bfloat16. attention_mask (B, S), integer or bool: 1 = token,
    0 = padding, or None (nothing padded). Returns (B, Hq, S, D) in q's dtype: softmax(q kᵀ / sqrt(D)) v per
    head (in bfloat16 the grader allows 2e-2: compute the scores and the softmax in float32 and cast the result
    back, as transformers does for the softmax), where

    - key/value head j serves the g = Hq / Hkv query heads j·g ... j·g + g - 1 (neighbours, as transformers'
      repeat_kv and torch.repeat_interleave lay them out);
    - query i attends to key j only if j <= i (causal) and key j is a real token;
    - a query with no key it may attend to (a padding position before the first real token, when padding
      is on the left) must still come out finite: NaN there would reach every later layer. The package lets
      such a query attend to itself. Rows of padding queries are dropped later: the grader checks only that
      they are finite."""
    raise NotImplementedError(
        "grouped_query_attention: see lesson 01, section 4 (grouped-query attention, causal mask with padding)"
    )


def prompt_rows(
    hidden: torch.Tensor, attention_mask: torch.Tensor, prefix_tokens: int = 34
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states of a batch of templated prompts -> the MMDiT's (embeds, mask).

    hidden (B, S, hidden_size); attention_mask (B, S), 1 = token, 0 = padding (on either side). For each
    prompt: keep its real tokens, in order, drop the first `prefix_tokens` of them (the template's system
    prompt, 34 for text-to-image), and put the rest at the start of a row. Rows are right-padded with zeros
    to the longest prompt's length L. Returns embeds (B, L, hidden_size) in hidden's dtype and mask (B, L)
    long, 1 for the kept rows."""
    raise NotImplementedError(
        "prompt_rows: see lesson 01, sections 3 and 6 (the 34 dropped tokens; embeds and mask)"
    )

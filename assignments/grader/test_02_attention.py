"""Lesson 02's second assignment (assignments/joint_attention.py): one attention over [text, image], the
padding mask on the text keys, against the package (qwenimage_minimal.mmdit.JointAttention) and diffusers'
QwenDoubleStreamAttnProcessor2_0."""

import pytest
import torch
import torch.nn.functional as F

from conftest import check, load
from qwenimage_minimal import mmdit

attention = load("joint_attention")
g = torch.Generator().manual_seed(0)
HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)


def seeded(make):
    """make() with its random weights drawn from seed 0, leaving the global generator as it was: the same
    weights in every run, whatever ran before in the process."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make()


def inputs(B, L, N, padded=True, dtype=torch.float32):
    """Image and text hidden states, their RoPE tables, and a text mask with padding at the end of row 0."""
    img, txt = torch.randn(B, N, 32, generator=g).to(dtype), torch.randn(B, L, 32, generator=g).to(dtype)
    tables = mmdit.rope_tables(
        [(1, 1, N)], L, mmdit.MMDiTConfig(attention_head_dim=HEAD_DIM, axes_dims_rope=AXES)
    )
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, max(1, L // 2) :] = 0  # row 0 is half padding; any other row has none
    return img, txt, tables, mask if padded else None


def streams(attn, img, txt, tables, rotate):
    """Each stream's rotated queries and keys and its values (B, S, H, D), as the block computes them."""
    split = lambda t: t.unflatten(-1, (-1, HEAD_DIM))
    img_rope, txt_rope = tables
    return (
        rotate(attn.norm_q(split(attn.to_q(img))), img_rope),
        rotate(attn.norm_k(split(attn.to_k(img))), img_rope),
        split(attn.to_v(img)),
        rotate(attn.norm_added_q(split(attn.add_q_proj(txt))), txt_rope),
        rotate(attn.norm_added_k(split(attn.add_k_proj(txt))), txt_rope),
        split(attn.add_v_proj(txt)),
    )


def caught(out_proj, add_out_proj, call):
    """The attention output each stream hands its output projection, caught on its way in: (img, txt)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in (out_proj, add_out_proj)]
    call()
    [h.remove() for h in hooks]
    return seen[0], seen[1]


@torch.no_grad()
def package_case(B, L, N, padded=True, dtype=torch.float32):
    """Per-stream q, k, v from the package's JointAttention, its attention output (img, txt), the text mask."""
    img, txt, tables, txt_mask = inputs(B, L, N, padded, dtype)
    attn = seeded(lambda: mmdit.JointAttention(32, HEADS, HEAD_DIM, 1e-6)).to(dtype)
    call = lambda: attn(img, txt, *tables, mmdit.joint_key_mask(txt_mask, N))
    return (
        streams(attn, img, txt, tables, mmdit.apply_rope),
        caught(attn.to_out, attn.to_add_out, call),
        txt_mask,
    )


def attend(q, k, v, mask):  # (B, S, H, D) -> (B, S, H * D)
    t = lambda x: x.transpose(1, 2)
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask)).flatten(2)


def typical_mistakes(img_q, img_k, img_v, txt_q, txt_k, txt_v, txt_mask):
    """(img_out, txt_out, hint) of each typical mistake."""
    (B, N), L = img_q.shape[:2], txt_q.shape[1]
    keys = torch.ones(B, L + N, dtype=torch.bool)  # [text | image] keys; True = attended
    if txt_mask is not None:
        keys[:, :L] = txt_mask.bool()
    text_first = [torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
    image_first = [torch.cat(pair, dim=1) for pair in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v))]
    right, order = attend(*text_first, keys[:, None, None]), attend(*image_first, keys[:, None, None])
    no_mask, on_queries = attend(*text_first, None), attend(*text_first, keys[:, None, :, None])
    return [
        (
            order[:, L:],
            order[:, :L],
            "you put the image first in the joint sequence but masked and split it as "
            "[text, image]: the sequence is [text, image], and the mask and the split must follow that order",
        ),
        (no_mask[:, L:], no_mask[:, :L], "padded text keys were attended: mask the keys where txt_mask is 0"),
        (
            on_queries[:, L:],
            on_queries[:, :L],
            "you masked the padded text *queries* (mask shape (B, 1, S, 1)); "
            "the mask must hide the padded *keys* from every query: shape (B, 1, 1, S)",
        ),
        (right[:, :L], right[:, L:], "the streams came back swapped: the first L outputs are the text's"),
    ]


def grade(what, got, expected, mistakes, atol=1e-5):
    assert isinstance(got, (tuple, list)) and len(got) == 2, f"{what}: return (img_out, txt_out)"
    (img, txt), (img_expected, txt_expected) = got, expected
    if img.shape != img_expected.shape and img.shape == txt_expected.shape:
        raise AssertionError(
            f"{what}: img_out has the text's shape: the streams came back swapped (the first L outputs are the text's)"
        )
    # the text first: it tells the mistakes apart (masked queries give the image what no mask gives it)
    check(f"{what}, txt_out", txt, txt_expected, [(t, hint) for _, t, hint in mistakes], atol, atol)
    check(f"{what}, img_out", img, img_expected, [(i, hint) for i, _, hint in mistakes], atol, atol)


@pytest.mark.parametrize(
    "B, L, N, padded", [(2, 5, 7, True), (1, 4, 9, True), (2, 6, 6, True), (2, 3, 5, False)]
)
def test_matches_the_package(B, L, N, padded):
    qkv, expected, txt_mask = package_case(B, L, N, padded)
    got = attention.joint_attention(*qkv, txt_mask)
    what = f"joint_attention(B={B}, L={L}, N={N}, padding={padded})"
    grade(what, got, expected, typical_mistakes(*qkv, txt_mask))


def test_padded_text_keys_and_values_do_not_matter():
    img, txt, tables, txt_mask = inputs(2, 6, 5)
    attn = seeded(lambda: mmdit.JointAttention(32, HEADS, HEAD_DIM, 1e-6))
    qkv = list(streams(attn, img, txt, tables, mmdit.apply_rope))
    img_out, txt_out = attention.joint_attention(*qkv, txt_mask)
    for i in (4, 5):  # the padded text keys and values -> noise
        qkv[i] = torch.where(
            txt_mask.bool()[:, :, None, None], qkv[i], 100 * torch.randn(qkv[i].shape, generator=g)
        )
    img_again, txt_again = attention.joint_attention(*qkv, txt_mask)
    check("img_out after changing the padded text keys and values", img_again, img_out)
    real = txt_mask.bool()
    check("txt_out of the real text tokens after changing the padded ones", txt_again[real], txt_out[real])


def test_matches_diffusers():
    from diffusers.models.transformers.transformer_qwenimage import (
        QwenImageTransformerBlock,
        apply_rotary_emb_qwen,
    )

    img, txt, tables, txt_mask = inputs(2, 5, 7)
    attn = seeded(lambda: QwenImageTransformerBlock(32, HEADS, HEAD_DIM).attn)
    rotate = lambda x, r: apply_rotary_emb_qwen(x, r, use_real=False)
    with torch.no_grad():
        qkv = streams(attn, img, txt, tables, rotate)
        call = lambda: attn(img, txt, encoder_hidden_states_mask=txt_mask.bool(), image_rotary_emb=tables)
        expected = caught(attn.to_out[0], attn.to_add_out, call)
        got = attention.joint_attention(*qkv, txt_mask)
        grade("joint_attention against diffusers' QwenDoubleStreamAttnProcessor2_0", got, expected, [])


def test_bf16_in_bf16_out():
    qkv, expected, txt_mask = package_case(2, 5, 7, dtype=torch.bfloat16)
    got = attention.joint_attention(*qkv, txt_mask)
    grade("joint_attention on bf16 inputs", got, expected, [], atol=2e-2)

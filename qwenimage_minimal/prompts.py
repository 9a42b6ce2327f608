"""Prompts: the chat templates Qwen-Image wraps around a prompt, and prompt -> embeddings.

Qwen-Image does not use Qwen2.5-VL to write text. It wraps the prompt in a chat template, runs the
language model (text_encoder.py) once, and keeps the last hidden state of the tokens *after* the
template's system prompt as the conditioning sequence for the MMDiT:

    "<|im_start|>system\\nDescribe the image by detailing ...<|im_end|>\\n<|im_start|>user\\n{prompt}
     <|im_end|>\\n<|im_start|>assistant\\n"
    -> token ids -> decoder -> (B, S, 3584) -> drop the 34 prefix tokens -> (B, L, 3584)

Dropping the prefix loses nothing: attention is causal, so every kept token has already read the
system prompt. The closing "<|im_end|>\\n<|im_start|>assistant\\n" stays.

Edit prompts also hold images. The user part starts with `<|vision_start|><|image_pad|><|vision_end|>`
per image (Edit-2509 and later number them: "Picture 1: <image>Picture 2: <image>"); each
`<|image_pad|>` is repeated once per merged 2x2 patch group of its image, those slots take the
vision tower's features (vision.py) instead of token embeddings, and they get 3-D positions
(text_encoder.multimodal_position_ids). The Edit template's prefix is 64 tokens; the image tokens
come after it, so the MMDiT sees the image's hidden states as part of the prompt.
"""

from __future__ import annotations

import warnings

import torch

from .text_encoder import TextEncoder, multimodal_position_ids

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
T2I_PREFIX_TOKENS = 34  # the template's tokens before the prompt: dropped from the embeddings
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_PREFIX_TOKENS = 64
MAX_PROMPT_TOKENS = 1024  # tokens kept after the prefix (text-to-image), as in diffusers
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def edit_prompt_prefix(num_images: int, numbered: bool) -> str:
    """The image part of an Edit prompt: one placeholder (Edit), or one "Picture i: " each (Edit-2509+)."""
    if not numbered:
        return IMAGE_PLACEHOLDER * num_images
    return "".join(f"Picture {i + 1}: {IMAGE_PLACEHOLDER}" for i in range(num_images))


def expand_image_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """[..., pad, ..., pad, ...] -> the k-th pad repeated counts[k] times (one per merged patch group)."""
    out, k = [], 0
    for token in ids:
        if token == pad_id:
            out.extend([pad_id] * counts[k])
            k += 1
        else:
            out.append(token)
    return out


def check_max_sequence_length(value, allow_none: bool = False, hint: str = "") -> None:
    """The one check of `max_sequence_length`, for every function that takes it."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PROMPT_TOKENS:
        raise ValueError(
            f"max_sequence_length must be {'None or ' if allow_none else ''}in 1..{MAX_PROMPT_TOKENS}, "
            f"got {value!r}{hint}"
        )


def check_prompts(prompts) -> list[str]:
    """A str or a non-empty list of str, each valid Unicode -> the list."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt must be a str or a non-empty list of str")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompt(s) at index {bad} are not str: {[type(prompts[i]).__name__ for i in bad]}")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. half of an emoji cut by a byte-level slice
            raise ValueError(
                f"prompt {i} is not valid Unicode: character {e.start} ({p[e.start : e.end]!r}) cannot "
                f"be encoded ({e.reason}); remove it or decode the text properly"
            ) from None
    return list(prompts)


def encode_prompts(
    tokenizer,
    encoder: TextEncoder,
    prompts,
    template: str = T2I_TEMPLATE,
    prefix_tokens: int = T2I_PREFIX_TOKENS,
    max_sequence_length: int | None = MAX_PROMPT_TOKENS,
    device=None,
    image_features: torch.Tensor | None = None,
    image_grid_thw=None,
    merge_size: int = 2,
    image_positions: str = "3d",
):
    """prompts -> (embeds (B, L, hidden), mask (B, L) long), right-padded to the longest prompt.

    Each prompt goes through the template; the first `prefix_tokens` tokens (the system prompt and
    "<|im_start|>user\\n") are removed from the hidden states. The mask is always returned (all
    ones when nothing is padded).

    Text only: at most 1024 tokens after the template prefix are encoded (the rest is cut, with a
    warning); `max_sequence_length` then cuts the result, as in diffusers.

    With images (Edit): every prompt must hold one `<|image_pad|>` per image; the i-th is
    expanded to image i's token count and filled with its rows of `image_features` (the vision
    tower's output for all images, in order, (N, hidden)), with 3-D positions. Nothing is cut, as in
    diffusers' Edit pipelines; a prompt whose text alone is over 1024 tokens is an error.
    image_positions="3d" gives image tokens their grid positions, as Qwen2.5-VL was trained;
    "sequential" numbers them like text, which is what diffusers 0.42.1 with transformers 5.x
    computes (its encoder call omits `mm_token_type_ids`, diffusers issue #14194): use it only to
    reproduce such outputs."""
    prompts = check_prompts(prompts)
    if max_sequence_length is not None:  # None: Edit, whose prompts are never cut
        check_max_sequence_length(max_sequence_length)
    if image_positions not in ("3d", "sequential"):
        raise ValueError(f"image_positions must be '3d' or 'sequential', got {image_positions!r}")
    # (That the tokenizer's ids fit the encoder's embedding table is checked once, where a pipeline joins them.)
    ids = [tokenizer.encode(template.format(p)) for p in prompts]
    if image_features is None:
        kept = min(MAX_PROMPT_TOKENS, max_sequence_length or MAX_PROMPT_TOKENS)
        for i, x in enumerate(ids):
            if len(x) - prefix_tokens > kept:
                warnings.warn(
                    f"prompt {i} is {len(x) - prefix_tokens} tokens long with the template; only the "
                    f"first {kept} are used (max_sequence_length; the rest, including the template's "
                    "closing tokens, is cut, as in diffusers)",
                    stacklevel=2,
                )
        ids = [x[: MAX_PROMPT_TOKENS + prefix_tokens] for x in ids]
    else:
        if image_grid_thw is None:
            raise ValueError(
                "image_features needs image_grid_thw: the (t, h, w) patch grid of each image, in order"
            )
        pad_id = tokenizer.token_to_id(IMAGE_PAD)
        counts = [t * h * w // merge_size**2 for t, h, w in image_grid_thw]
        if sum(counts) != len(image_features):
            raise ValueError(
                f"image_features has {len(image_features)} rows but image_grid_thw {image_grid_thw} "
                f"needs {sum(counts)}"
            )
        for i, x in enumerate(ids):
            if x.count(pad_id) != len(counts):
                raise ValueError(
                    f"prompt {i} holds {x.count(pad_id)} {IMAGE_PAD} token(s) but {len(counts)} "
                    f"image(s) are given: put one {IMAGE_PLACEHOLDER} per image in the template"
                )
            if len(x) - len(counts) - prefix_tokens > MAX_PROMPT_TOKENS:
                raise ValueError(
                    f"prompt {i} is {len(x) - len(counts) - prefix_tokens} tokens long with the "
                    f"template; Edit prompts may have at most {MAX_PROMPT_TOKENS}: shorten it"
                )
        ids = [expand_image_pads(x, pad_id, counts) for x in ids]
    input_ids, attention_mask = tokenizer.pad(ids)  # (B, S) each
    device = device or encoder.embed_tokens.weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    position_ids = inputs_embeds = None
    if image_features is not None:
        inputs_embeds = encoder.embed_tokens(input_ids)  # (B, S, hidden)
        slots = (input_ids == pad_id)[..., None]
        features = image_features.to(device, inputs_embeds.dtype).repeat(
            len(ids), 1
        )  # the same images per prompt
        inputs_embeds = inputs_embeds.masked_scatter(slots, features)
        if image_positions == "3d":
            position_ids = multimodal_position_ids(
                input_ids, attention_mask, list(image_grid_thw) * len(ids), pad_id, merge_size
            )  # (3, B, S)
    with torch.no_grad():
        hidden = encoder(input_ids, attention_mask, position_ids, inputs_embeds)  # (B, S, hidden)

    kept = [h[m.bool()][prefix_tokens:] for h, m in zip(hidden, attention_mask)]  # per prompt (L_b, hidden)
    L = max(len(k) for k in kept)
    embeds = hidden.new_zeros(len(kept), L, hidden.shape[-1])  # (B, L, hidden)
    mask = torch.zeros(len(kept), L, dtype=torch.long, device=device)  # (B, L)
    for b, k in enumerate(kept):
        embeds[b, : len(k)] = k
        mask[b, : len(k)] = 1
    if max_sequence_length is not None:
        embeds, mask = embeds[:, :max_sequence_length], mask[:, :max_sequence_length]
    return embeds, mask

"""Assignment for lesson 02 (notebooks/02_mmdit_and_rope.ipynb, section 4): the joint attention of a
dual-stream block.

Each stream (text, image) has already projected, normalised and rotated its own queries, keys and values;
here the two streams meet. Write the function below, then run `make grade LESSON=02`. The package does
this inside `qwenimage_minimal.mmdit.JointAttention.forward` (with `joint_key_mask`): do not call them
(the grader compares against them and against diffusers' QwenDoubleStreamAttnProcessor2_0).
"""

import torch


def joint_attention(
    img_q: torch.Tensor,
    img_k: torch.Tensor,
    img_v: torch.Tensor,
    txt_q: torch.Tensor,
    txt_k: torch.Tensor,
    txt_v: torch.Tensor,
    txt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax attention over both streams -> (img_out (B, N, H * D), txt_out (B, L, H * D)).

    img_q, img_k, img_v  (B, N, H, D) the image tokens' queries, keys, values (already rotated)
    txt_q, txt_k, txt_v  (B, L, H, D) the text tokens' (already rotated)
    txt_mask             (B, L), 1 / True = a real text token, 0 / False = padding; or None (no padding)

    The joint sequence is [text, image] (text first): concatenate along the sequence, attend with
    softmax(q k^T / sqrt(D)) v per head (torch.nn.functional.scaled_dot_product_attention takes (B, H, S, D)),
    and let no query attend to a padded text *key* (image keys are never masked; padded text queries still
    get an output, which the model ignores). Then flatten the heads and split the result back into the
    two streams, the image's first. Outputs have the inputs' dtype."""
    raise NotImplementedError(
        "joint_attention: see lesson 02, section 4 (one attention over [text, image], the padding mask on keys)"
    )

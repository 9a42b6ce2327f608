"""Assignment for lesson 04 (notebooks/04_vae.ipynb, section 5): the VAE's causal 3-D convolution and its cache.

Write the function below, then run `make grade LESSON=04`. The package's own version is
`qwenimage_minimal.vae.CausalConv3d`: do not call it (the grader compares against it and against diffusers'
QwenImageCausalConv3d).
"""

import torch


def causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int, int],
    past: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stride-1 3-D convolution that never looks at a later frame -> (y (B, O, T, H', W'), keep).

    x        (B, C, T, H, W) one chunk of a video (frames along dim 2)
    weight   (O, C, kt, kh, kw), bias (O,) or None, as torch.nn.functional.conv3d takes them
    padding  (pt, ph, pw) as given to the layer (nn.Conv3d's meaning): rows get ph zeros above and below,
             columns pw left and right, but time gets 2 * pt zero frames *before* the first frame and none after
             it, so output frame t sees input frames t - 2 * pt .. t (for Qwen-Image's convs, 2 * pt = kt - 1)
    past     the previous chunk's last input frames (B, C, <= 2 * pt, H, W), or None for the first chunk:
             they stand in front of x in place of that many zero frames
    keep     the last 2 * pt input frames seen so far (past, then x): the next chunk's `past`

    Fed chunk by chunk, each call given the previous call's `keep`, the outputs concatenated along time equal
    one call on the whole video."""
    raise NotImplementedError(
        "causal_conv3d: see lesson 04, section 5 (padding on the past side only, the cache of the last frames)"
    )

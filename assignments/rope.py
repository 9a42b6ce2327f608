"""Assignment for lesson 02 (notebooks/02_mmdit_and_rope.ipynb, section 3; section 4 applies it): RoPE, the
MMDiT's positions.

Write the two functions below, then run `make grade LESSON=02`. The package's own versions are
`qwenimage_minimal.mmdit.rope_table` and `apply_rope`: do not call them (the grader compares against them).
"""

import torch


def rope_table(positions: torch.Tensor, axes_dims: tuple, theta: float) -> torch.Tensor:
    """(S, 3) positions (frame, row, column) -> (S, sum(axes_dims) / 2) complex rotations.

    Each axis a owns axes_dims[a] / 2 frequencies: inv_freq_k = 1 / theta ** (2k / axes_dims[a]) for
    k = 0 .. axes_dims[a] / 2 - 1, and its angles are positions[:, a] * inv_freq. The three axes' angles are
    concatenated (frame first), and each angle becomes e^{i angle} (torch.polar). Qwen-Image: axes_dims
    (16, 56, 56), theta 10000."""
    raise NotImplementedError("rope_table: see lesson 02, section 3 (MSRoPE, the per-axis formula)")


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, S, H, D) by rotations (S, D / 2) complex.

    The pairs are *interleaved*: channels (0, 1) are the first complex number, (2, 3) the second, ...; each
    pair is multiplied by its rotation, the same for every head. Compute in float32 and return x's dtype."""
    raise NotImplementedError(
        "apply_rope: see lesson 02, sections 3 and 4 (interleaved pairs, one rotation per pair)"
    )

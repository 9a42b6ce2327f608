"""Assignment for lesson 04 (notebooks/04_vae.ipynb, section 6): cross-fading the overlap of two decoded tiles.

Write the function below, then run `make grade LESSON=04`. The package's own version is
`qwenimage_minimal.vae.blend_tiles`: do not call it (the grader compares against it and against diffusers'
AutoencoderKLQwenImage.blend_v / blend_h).
"""

import torch


def blend_tiles(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the start of tile `cur` with the end of its neighbour `prev` -> the blended `cur`.

    prev, cur  tiles (..., H, W) that overlap: prev is the tile above (dim=-2, rows) or to the left (dim=-1,
               columns), and cur's first rows (columns) show the same pixels as prev's last ones
    extent     how many rows (columns) to blend; capped at both tiles' size along dim

    Along dim, with size = prev.shape[dim] and y = 0 .. extent - 1:
        out[y] = prev[size - extent + y] * (1 - y / extent) + cur[y] * y / extent,
    a linear ramp from all of prev to (almost) all of cur; the rest of cur is kept as it is. The result has
    cur's shape and dtype."""
    raise NotImplementedError("blend_tiles: see lesson 04, section 6 (the overlaps are blended linearly)")

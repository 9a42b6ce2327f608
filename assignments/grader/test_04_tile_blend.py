"""Lesson 04's assignment (assignments/tile_blend.py): the linear cross-fade of overlapping tiles, against the
package (qwenimage_minimal.vae.blend_tiles, and its tiled run) and diffusers' AutoencoderKLQwenImage.blend_v / blend_h."""

import pytest
import torch

from conftest import check, load
from qwenimage_minimal import vae

tiles = load("tile_blend")
g = torch.Generator().manual_seed(0)


def mix(prev, cur, extent, dim, w, prev_start):
    """cur with its first `extent` rows/columns = prev's `extent` from prev_start * (1 - w) + cur's * w."""
    shape = [1] * cur.ndim
    shape[dim] = extent
    w = w.view(shape)
    mixed = prev.narrow(dim, prev_start, extent) * (1 - w) + cur.narrow(dim, 0, extent) * w
    return torch.cat([mixed, cur.narrow(dim, extent, cur.shape[dim] - extent)], dim=dim)


@pytest.mark.parametrize("dim, extent", [(-2, 3), (-1, 4), (-2, 9)])  # 9: more than a tile, capped
def test_blend_matches_the_package(dim, extent):
    prev, cur = (torch.randn(2, 3, 5, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g))
    if dim == -1:
        prev, cur = prev.transpose(-1, -2), cur.transpose(-1, -2)  # a left neighbour: tiles share their rows
    n = min(extent, prev.shape[dim], cur.shape[dim])
    ramp, end = torch.arange(n) / n, prev.shape[dim] - n
    mistakes = [
        (
            mix(prev, cur, n, dim, 1 - ramp, end),
            "the ramp is reversed: cur's weight rises from 0 (y / extent)",
        ),
        (
            mix(prev, cur, n, dim, ramp, 0),
            "you blended with prev's *first* rows/columns: cur overlaps prev's last",
        ),
        (
            mix(prev, cur, n, dim, torch.linspace(0, 1, n), end),
            "the weights are y / extent for y = 0 .. extent - 1, "
            "not evenly from 0 to 1 (torch.linspace): cur's weight never reaches 1 inside the band",
        ),
    ]
    got = tiles.blend_tiles(prev.clone(), cur.clone(), extent, dim)
    check(
        f"blend_tiles(prev, cur, {extent}, dim={dim})", got, vae.blend_tiles(prev, cur, extent, dim), mistakes
    )


def test_blend_matches_diffusers():
    from diffusers import AutoencoderKLQwenImage

    prev, cur = (
        torch.randn(1, 3, 1, 6, 5, generator=g),
        torch.randn(1, 3, 1, 6, 5, generator=g),
    )  # (B, C, T, H, W)
    blend = tiles.blend_tiles
    for dim, reference in ((-2, AutoencoderKLQwenImage.blend_v), (-1, AutoencoderKLQwenImage.blend_h)):
        expected = reference(None, prev.clone(), cur.clone(), 4)  # `self` is not used; it blends in place
        check(
            f"blend_tiles(dim={dim}) against diffusers' {reference.__name__}",
            blend(prev, cur, 4, dim),
            expected,
        )


def test_blend_in_bf16():
    prev, cur = (torch.randn(1, 3, 8, 8, generator=g).bfloat16() for _ in range(2))
    check(
        "blend_tiles on bf16 tiles",
        tiles.blend_tiles(prev, cur, 5, -1),
        vae.blend_tiles(prev, cur, 5, -1),
        atol=1e-2,
        rtol=1e-2,
    )


def test_a_tiled_run_with_your_blend():
    x = torch.randn(1, 2, 20, 27, generator=g)
    fn = lambda tile: (
        tile * tile.mean() + tile.std()
    )  # a tile's output depends on the whole tile, as a decoder's
    check(
        "vae._tiled (tiles 8, stride 6) with your blend_tiles",
        vae._tiled(x, fn, 8, 6, out_scale=1, blend=tiles.blend_tiles),
        vae._tiled(x, fn, 8, 6, out_scale=1),
    )

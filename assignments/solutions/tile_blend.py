"""Reference solution of assignments/tile_blend.py (the instructor's; `make student` leaves this folder out)."""

import torch


def blend_tiles(prev, cur, extent, dim):
    extent = min(extent, prev.shape[dim], cur.shape[dim])
    if extent <= 0:
        return cur.clone()
    shape = [1] * cur.ndim
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float64) / extent).view(shape)  # cur's weight y / extent, exact
    head = cur.narrow(dim, 0, extent)
    tail = prev.narrow(dim, prev.shape[dim] - extent, extent)
    mixed = tail * (1 - w).to(cur.dtype) + head * w.to(cur.dtype)
    return torch.cat([mixed, cur.narrow(dim, extent, cur.shape[dim] - extent)], dim=dim)

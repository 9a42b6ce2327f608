"""A typical wrong solution: every image on frame 0, so a reference token and a noise token at the same row and
column get the same position."""

import torch

from assignments.solutions.edit_positions import centred


def edit_positions(img_shapes, text_len):
    images = []
    for f, h, w in img_shapes:
        grid = torch.meshgrid(torch.arange(f, dtype=torch.float32), centred(h), centred(w), indexing="ij")
        images.append(torch.stack(grid, dim=-1).reshape(f * h * w, 3))
    start = max(max(h // 2, w // 2) for _, h, w in img_shapes)
    text = torch.arange(start, start + text_len, dtype=torch.float32)
    return torch.cat(images), text[:, None].repeat(1, 3)

"""A typical wrong solution: rows and columns counted from 0 (the top-left corner) instead of centred."""

import torch


def edit_positions(img_shapes, text_len):
    images = []
    for index, (f, h, w) in enumerate(img_shapes):
        frame = torch.arange(index, index + f, dtype=torch.float32)
        rows, cols = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
        grid = torch.meshgrid(frame, rows, cols, indexing="ij")
        images.append(torch.stack(grid, dim=-1).reshape(f * h * w, 3))
    start = max(max(h // 2, w // 2) for _, h, w in img_shapes)
    text = torch.arange(start, start + text_len, dtype=torch.float32)
    return torch.cat(images), text[:, None].repeat(1, 3)

"""A typical wrong solution: the text positions start at 0, where the centred images already are."""

import torch

from assignments.solutions.edit_positions import edit_positions as right


def edit_positions(img_shapes, text_len):
    img_pos, _ = right(img_shapes, text_len)
    return img_pos, torch.arange(text_len, dtype=torch.float32)[:, None].repeat(1, 3)

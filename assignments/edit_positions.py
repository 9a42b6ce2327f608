"""Assignment for lesson 06 (notebooks/06_edit.ipynb, section 5): the 3-D positions of an Edit sequence, the
image being generated and its reference images, then the text.

Write the function below, then run `make grade LESSON=06`. The package builds these positions in
`qwenimage_minimal.mmdit.image_positions`, `text_positions` and `rope_tables`: do not call them (the grader
compares against them and against diffusers' QwenEmbedRope).
"""

import torch


def edit_positions(img_shapes: list, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames, rows, columns) positions -> (img_pos (N, 3), txt_pos (text_len, 3)), float32.

    img_shapes  [(f, h, w), ...] in tokens: the latent being denoised first, then each reference image;
                N = the sum of f * h * w
    text_len    the number of text tokens

    Image i's tokens come in the list's order, each image row-major (frame, then row, then column slowest to
    fastest), with the position (frame, row, column):
      frame   i, i + 1, ..., i + f - 1: the image's place in the list (0 = the noise, 1, 2, ... = references)
      row     centred: h rows get -(h - h // 2) .. h // 2 - 1 (an odd h has one row more above 0 than below)
      column  centred the same way over w
    The text is 1-D: token j gets (s + j, s + j, s + j), where s = max(h // 2, w // 2) over *all* the images,
    the first value past every image's rows and columns."""
    raise NotImplementedError(
        "edit_positions: see lesson 06, section 5 (a frame index per image, centred rows and columns, text after)"
    )

"""Reference solution of assignments/scene_reader.py."""

import numpy as np

from qwenimage_minimal.nano import scenes

PALETTE = np.array([scenes.BACKGROUND, *scenes.ALL_COLOURS.values()], dtype=np.float64)  # (1 + colours, 3)


def colour_map(image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    distance = np.sqrt(((pixels[:, :, None, :] - PALETTE) ** 2).sum(-1))  # (H, W, 1 + colours)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > 120] = -1
    return labels


def blob_shape(blob: np.ndarray) -> str:
    rows, cols = np.nonzero(blob)
    box = blob[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # (h, w)
    spans = np.zeros(len(box))
    for i, row in enumerate(box):
        set_pixels = np.flatnonzero(row)
        if len(set_pixels):
            spans[i] = set_pixels[-1] - set_pixels[0] + 1
    fill = spans.sum() / box.size
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    smoothed = np.convolve(spans, np.ones(3) / 3, mode="same")
    widest = (int(np.argmax(smoothed)) + 0.5) / len(box)  # 0 = top, 1 = bottom
    return "triangle" if widest > 0.68 else "diamond"


def read_object(image, thing) -> dict:
    labels = colour_map(image)  # (H, W)
    H, W = labels.shape
    colour = list(scenes.ALL_COLOURS).index(thing.colour) + 1
    found = scenes.blobs(labels == colour, max(4, H * W // 400))  # largest first
    verdict = {"present": bool(found), "colour": bool(found), "shape": False, "position": False}
    if found:
        ys, xs = np.nonzero(found[0])
        cell = (min(2, int(3 * ys.mean() / H)), min(2, int(3 * xs.mean() / W)))
        verdict["shape"] = blob_shape(found[0]) == thing.shape
        verdict["position"] = scenes.POSITIONS[thing.position] == cell
    verdict["correct"] = verdict["colour"] and verdict["shape"] and verdict["position"]
    return verdict

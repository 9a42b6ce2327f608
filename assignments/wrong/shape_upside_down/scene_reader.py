"""A typical wrong solution: the widest row's place counted from the bottom, so triangles and diamonds swap
wherever the widest row is low."""

import numpy as np

from assignments.solutions.scene_reader import colour_map  # right as it is
from qwenimage_minimal.nano import scenes


def blob_shape(blob: np.ndarray) -> str:
    rows, cols = np.nonzero(blob)
    box = blob[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # (h, w)
    spans = np.array([np.ptp(np.flatnonzero(r)) + 1 if r.any() else 0 for r in box], dtype=np.float64)
    fill = spans.sum() / box.size
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    smoothed = np.convolve(spans, np.ones(3) / 3, mode="same")
    widest = 1 - (int(np.argmax(smoothed)) + 0.5) / len(box)  # the mistake: 0 = bottom
    return "triangle" if widest > 0.68 else "diamond"


def read_object(image, thing) -> dict:
    """The reference's reading, with this module's shapes."""
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

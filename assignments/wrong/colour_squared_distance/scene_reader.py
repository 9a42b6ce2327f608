"""A typical wrong solution: the nearest colour's squared distance compared with the threshold of 120."""

import numpy as np

from assignments.solutions.scene_reader import PALETTE, blob_shape  # right as they are
from qwenimage_minimal.nano import scenes


def colour_map(image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    squared = ((pixels[:, :, None, :] - PALETTE) ** 2).sum(-1)  # (H, W, 1 + colours)
    labels = squared.argmin(-1)
    labels[squared.min(-1) > 120] = -1
    return labels


def read_object(image, thing) -> dict:
    """The reference's reading, on this module's colour map."""
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

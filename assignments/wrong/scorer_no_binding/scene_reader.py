"""A typical wrong solution: the shape and the cell judged on the largest blob of any colour, so the scorer does
not check that each colour sits on the shape the caption gives it (attribute binding)."""

import numpy as np

from assignments.solutions.scene_reader import blob_shape, colour_map
from qwenimage_minimal.nano import scenes


def read_object(image, thing) -> dict:
    labels = colour_map(image)  # (H, W)
    H, W = labels.shape
    colour = list(scenes.ALL_COLOURS).index(thing.colour) + 1
    present = bool(scenes.blobs(labels == colour, max(4, H * W // 400)))
    verdict = {"present": present, "colour": present, "shape": False, "position": False}
    if present:
        largest = scenes.blobs(labels > 0, max(4, H * W // 400))[0]  # any colour: the mistake
        ys, xs = np.nonzero(largest)
        cell = (min(2, int(3 * ys.mean() / H)), min(2, int(3 * xs.mean() / W)))
        verdict["shape"] = blob_shape(largest) == thing.shape
        verdict["position"] = scenes.POSITIONS[thing.position] == cell
    verdict["correct"] = verdict["colour"] and verdict["shape"] and verdict["position"]
    return verdict

"""Assignment for lesson 00 (notebooks/00_nano.ipynb, section 1, "The yardstick"): the scorer that reads a scene
back from its pixels.

Write the three functions below, then run `make grade LESSON=00`. The package's own are
`qwenimage_minimal.nano.scenes.colour_map`, `blob_shape`, `blob_position` and `score`: do not call them (the
grader compares against them). You may call `scenes.blobs` (connected components: not what the lesson teaches)
and use the constants of `scenes` (BACKGROUND, ALL_COLOURS, POSITIONS).
"""

import numpy as np

from qwenimage_minimal.nano import scenes  # noqa: F401  (the palette, the grid, blobs)


def colour_map(image) -> np.ndarray:
    """A PIL image (W x H, any mode) -> (H, W) integers: the index of each pixel's nearest palette colour.

    The palette is [scenes.BACKGROUND, *scenes.ALL_COLOURS.values()] (the eight scene colours, then the new
    ones: brown, black, grey), so 0 is the background and i + 1 the i-th colour of ALL_COLOURS. "Nearest" is
    the Euclidean distance in RGB (0..255 per channel); a pixel farther than 120 from every palette colour is
    -1 (no colour of the scenes)."""
    raise NotImplementedError("colour_map: see lesson 00, section 1 (the yardstick: scenes.colour_map)")


def blob_shape(blob: np.ndarray) -> str:
    """An (H, W) boolean mask of one blob -> "square", "circle", "triangle" or "diamond".

    Crop the blob to its bounding box (h rows, w columns). Each row's span is last - first + 1 of its set
    pixels (0 for a row with none: holes inside a row do not count). fill = sum of the spans / (h * w):
    fill > 0.88 is a square, else fill > 0.66 a circle (pi / 4 ~ 0.79). Otherwise it is a triangle or a
    diamond (both ~ 1/2), told apart by where the widest row is: smooth the spans with a 3-wide moving average
    (np.convolve(spans, np.ones(3) / 3, mode="same"), which pads with zeros), take the first row of the
    largest smoothed span, and its place (row + 0.5) / h (0 = top, 1 = bottom): > 0.68 is a triangle (widest
    at the bottom), else a diamond (widest in the middle)."""
    raise NotImplementedError("blob_shape: see lesson 00, section 1 (the shape, from the fill of its box)")


def read_object(image, thing) -> dict:
    """What the pixels say about one object of a caption (a scenes.Thing: colour, shape, position):
    {"present", "colour", "shape", "position", "correct"}, five bools, as scenes.score gives for each object.

    Take the blobs (scenes.blobs, 4-neighbour) of the pixels whose colour_map is the thing's colour, ignoring
    specks smaller than max(4, H * W // 400) pixels. "present" and "colour": there is such a blob. The largest
    of them, and only it, is judged: "shape" is blob_shape(it) == thing.shape, "position" is whether the grid
    cell of its centroid (row = min(2, int(3 * mean y / H)), column likewise with x and W; scenes.POSITIONS
    maps names to (row, column)) is thing.position. Both are False when there is no blob. "correct": colour,
    shape and position all True. Judging the blob *of the stated colour* is what checks attribute binding."""
    raise NotImplementedError(
        "read_object: see lesson 00, section 1 (the yardstick: the largest blob of the stated colour)"
    )

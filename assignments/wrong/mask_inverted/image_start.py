"""A typical wrong solution: the mask read the wrong way round, black (0) as the region to repaint."""

from assignments.solutions import image_start
from assignments.solutions.image_start import blend, kept_sigmas, sdedit_start  # noqa: F401


def mask_tokens(mask, channels, patch=2, scale=8):
    return image_start.mask_tokens(1 - mask, channels, patch, scale)  # the mistake: 1 - mask

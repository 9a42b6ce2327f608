"""A typical wrong solution: inpainting's known region noised to the sigma the step started from, sigmas[i],
rather than the one it reached, sigmas[i + 1]."""

from assignments.solutions.image_start import kept_sigmas, mask_tokens, sdedit_start  # noqa: F401


def blend(x, x0, noise, repaint, sigmas, i):
    sigma = sigmas[i].to(x0.dtype)  # the mistake: the current sigma
    known = (1 - sigma) * x0 + sigma * noise
    return (1 - repaint) * known + repaint * x

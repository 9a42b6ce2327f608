"""A typical wrong solution: an off-by-one in the kept steps, the first kept sigma dropped too, so img2img runs one
step fewer and starts one sigma late (less noise than the strength asks for)."""

from assignments.solutions.image_start import blend, mask_tokens  # noqa: F401  (right as they are)


def kept_sigmas(sigmas, strength):
    steps = len(sigmas) - 1
    dropped = int(steps - steps * strength) + 1  # the mistake: one more than int(N - N * strength)
    if dropped > steps or not 0 < strength <= 1:
        raise ValueError(f"strength {strength!r} leaves no step")
    return sigmas[dropped:]


def sdedit_start(x0, noise, sigmas, strength):
    sigma = kept_sigmas(sigmas, strength)[0].to(x0.dtype)  # the right start, on this module's kept sigmas
    return (1 - sigma) * x0 + sigma * noise

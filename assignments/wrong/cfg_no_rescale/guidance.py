"""A typical wrong solution: CFG without the norm rescale."""

from assignments.solutions.guidance import euler_step  # noqa: F401


def cfg_combine(v_cond, v_uncond, scale):
    return v_uncond + scale * (v_cond - v_uncond)

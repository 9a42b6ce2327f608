"""What the notebooks share, kept out of the lessons: checking an exercise, one line per parity check, and a
framed grid of pictures.

The notebooks import it as `import course` (they run from this folder). It holds no model code:
the models are `qwenimage_minimal`'s, and the random-weight checkpoints come from `sizes.write_checkpoint`.

Exercises: each notebook ends with two or three. The task is a Markdown cell; the solution is the
code cell after it, collapsed (cell metadata `jupyter.source_hidden`, tag `solution`), and it calls
`check`, which raises with a hint when an answer is wrong. So CI runs every solution through its
check, and a student can call `check` on an answer of their own.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import torch


def _as_tensor(x, name: str = "answer") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu()
    try:
        return torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a number, a list of numbers or a tensor, got {type(x).__name__}: {x!r:.60}"
        ) from None


def check(what: str, answer, expected, rtol: float = 1e-5, atol: float = 1e-8, hint: str = "") -> None:
    """Compare an exercise's answer with the expected value; print ✓, or raise AssertionError saying how far off."""
    got, want = _as_tensor(answer, "answer"), _as_tensor(expected, "expected")
    if got.shape != want.shape:
        raise AssertionError(f"✗ {what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}. {hint}")
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs().max().item()
        raise AssertionError(f"✗ {what}: off by up to {err:.3g} (tolerance rtol={rtol}, atol={atol}). {hint}")
    print(f"✓ {what}")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|: the error relative to the output's scale."""
    ours, reference = _as_tensor(ours), _as_tensor(reference)
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def parity(what: str, ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-5) -> float:
    """Print the relative error of ours against the reference implementation, and assert it is below tol."""
    err = relative_error(ours, reference)
    print(f"{what}: max |ours - reference| / max |reference| = {err:.1e}  (tolerance {tol:.0e})")
    assert err < tol, f"{what}: {err:.2e} is above {tol:.0e}"
    return err


def tiles(pictures, labels, columns: int = 4, title: str | None = None, width: float = 2.3) -> None:
    """Show PIL pictures in framed panels, each under its label (the frames keep neighbouring scenes apart,
    where `images.picture_grid` butts them together)."""
    rows = math.ceil(len(pictures) / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(width * columns, (width + 0.65) * rows),
        squeeze=False,
        dpi=72,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_visible(False)
    for ax, picture, label in zip(axes.flat, pictures, labels):
        ax.set_visible(True)
        ax.imshow(picture)
        ax.set_title("\n".join(textwrap.wrap(label, 34)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    plt.show()

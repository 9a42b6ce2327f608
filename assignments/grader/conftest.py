"""The grader's plumbing: which implementation is graded, and failure messages that teach.

    make grade [LESSON=02]                    grades assignments/*.py (your work)
    ASSIGNMENTS=assignments/solutions make grade   grades the reference solutions (they pass)

`check` compares an answer with the package's, and when they differ says where (index), by how much, and,
if the answer equals one of the typical mistakes it is given, which mistake it is."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the typical mistakes of assignments/wrong reuse assignments.solutions


class Unloadable:
    """Stands in for a module that cannot be loaded: every function of it fails its test with the reason, so one
    missing or broken file fails its own lesson's tests and the other lessons are still graded."""

    def __init__(self, reason: str):
        self.reason = reason

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        pytest.fail(self.reason, pytrace=False)


def load(name: str):
    """The graded module `name` (e.g. "rope"): from $ASSIGNMENTS (a folder), else from assignments/."""
    folder = Path(os.environ.get("ASSIGNMENTS", ROOT / "assignments"))
    path = folder / f"{name}.py"
    if not path.is_file():
        return Unloadable(f"{path} does not exist: the assignment file is assignments/{name}.py")
    spec = importlib.util.spec_from_file_location(f"graded_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a syntax error, a failing import: this file's tests fail, saying why
        return Unloadable(f"{path} cannot be loaded: {type(e).__name__}: {e}")
    return module


def check(
    what: str, got, expected: torch.Tensor, mistakes=(), atol: float = 1e-5, rtol: float = 1e-5
) -> None:
    """Assert got ≈ expected. mistakes: (the output a typical mistake gives, what to tell the student)."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {got.dtype}, expected {expected.dtype}")
    if torch.allclose(got, expected, atol=atol, rtol=rtol):
        return
    for output, hint in mistakes:
        if output.shape == got.shape and torch.allclose(got.to(output.dtype), output, atol=atol, rtol=rtol):
            raise AssertionError(f"{what}: {hint}")
    diff = (got.to(expected.dtype) - expected).abs()
    if torch.is_complex(diff) or not torch.isfinite(diff).all():
        diff = diff.abs().nan_to_num(float("inf"))
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(
        f"{what}: differs by up to {diff.max().item():.3g} (tolerance {atol:g} + {rtol:g}·|expected|), first at "
        f"index {index}: got {got[index].item():.6g}, expected {expected[index].item():.6g}; "
        f"{(diff > atol + rtol * expected.abs()).float().mean().item():.1%} of the entries are off"
    )

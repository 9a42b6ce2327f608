"""The course's capstones (assignments/capstone.py), small: the reference solutions draw what the package draws,
a typical wrong solution is caught and its piece named, a stub says which lesson to read, and the LoRA
capstone's layer computes what the package's LoRALinear computes. (The full runs: `make capstone`.)"""

from pathlib import Path

import pytest
import torch
from torch import nn

from assignments import capstone
from assignments.solutions.lora_linear import lora_forward
from qwenimage_minimal import lora, mmdit, nano, sampling
from qwenimage_minimal.nano import scenes

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "assignments" / "solutions"
TWO = [scenes.parse_caption(text) for text in nano.DEMO_PROMPTS[:2]]


@pytest.fixture(scope="module")
def pipe():
    return capstone.nano_pipeline()


def test_the_reference_solutions_pass(capsys, tmp_path):
    args = ["pieces", "--assignments", str(SOLUTIONS), "--n", "2", "--steps", "4", "--out", str(tmp_path)]
    assert capstone.main(args) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "FAIL" not in printed, printed
    assert (tmp_path / "pieces.png").is_file()


@pytest.mark.parametrize("mistake, piece", [("rope_halves", "apply_rope"), ("euler_sign", "euler_step")])
def test_a_wrong_solution_differs_and_its_piece_is_named(pipe, mistake, piece):
    pieces = capstone.student_pieces(ROOT / "assignments" / "wrong" / mistake)
    out = capstone.compare_pieces(pipe, pieces, TWO, steps=4)
    assert not out["passed"] and out["difference"] > 0.1
    assert out["suspects"] == [piece], out["alone"]


def test_the_package_pieces_pass_and_leave_the_pipeline_as_it_was(pipe):
    out = capstone.compare_pieces(
        pipe, {"apply_rope": mmdit.apply_rope, "cfg_combine": sampling.cfg_combine}, TWO, 4
    )
    assert out["passed"] and out["difference"] == 0 and capstone.same_scores(*out["scores"])
    assert pipe.cfg_combine is sampling.cfg_combine and pipe.euler_step is sampling.euler_step
    assert pipe.transformer.rope_table is mmdit.rope_table
    attentions = [m for m in pipe.transformer.modules() if isinstance(m, mmdit.JointAttention)]
    assert attentions and all(m.apply_rope is mmdit.apply_rope for m in attentions)


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_a_folder_without_pieces_fails_instead_of_comparing_the_package_with_itself(capsys, tmp_path, folder):
    (tmp_path / "empty").mkdir()
    assert capstone.main(["pieces", "--assignments", str(tmp_path / folder), "--out", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "PASS" not in printed, printed


def test_a_lora_forward_that_detaches_its_adapter_is_refused():
    detached = lambda x, W, b, A, B, alpha, scale=1.0: lora_forward(
        x, W, b, A.detach(), B.detach(), alpha, scale
    )
    assert capstone.check_forward(lora_forward) < 1e-6
    with pytest.raises(capstone.NotWritten, match="detach"):
        capstone.check_forward(detached)


def test_the_stubs_say_which_lesson_to_read(capsys, tmp_path):
    args = [
        "pieces",
        "--assignments",
        str(ROOT / "assignments"),
        "--n",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert capstone.main(args) == 1
    printed = capsys.readouterr().out
    assert "not written yet" in printed and "see lesson 02" in printed and "see lesson 05" in printed
    assert "Traceback" not in printed and "FAIL: suspect" in printed


@pytest.mark.parametrize("bias", [True, False])
def test_the_lora_layer_with_the_reference_lora_forward_equals_the_package_one(bias):
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    layer = capstone.LoRALinear(base, lora_forward, rank=4, alpha=6.0, generator=g)
    x = torch.randn(2, 7, 24, generator=g)
    assert torch.equal(layer(x), base(x))  # B starts at zero: the model starts unchanged
    with torch.no_grad():
        layer.B.normal_(generator=g)
    package = lora.LoRALinear(base)
    package.add("brown", layer.A.detach(), layer.B.detach(), 6.0)
    torch.testing.assert_close(layer(x), package(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(layer(x), base(x), atol=1e-3)
    layer(x).sum().backward()
    assert layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0  # the adapter trains


def test_the_lora_capstone_trains_measures_and_writes_a_lora_the_package_reads(capsys, tmp_path, pipe):
    args = ["lora", "--assignments", str(SOLUTIONS), "--train-steps", "3", "--n", "1", "--steps", "2"]
    capstone.main([*args, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for row in ("without a LoRA", "your LoRA", "the committed LoRA"):
        assert row in printed, printed
    adapters, _ = lora.read_lora(tmp_path / "lora.safetensors", pipe.transformer)
    assert len(adapters) == len(lora.target_names(pipe.transformer, "all-linear"))
    assert any(B.abs().max() > 0 for _, B, *_ in adapters.values())  # B starts at 0: the steps moved it


@pytest.mark.parametrize(
    "folder, said",
    [("wrong/lora_r_over_alpha", "differs from the package's LoRALinear"), (".", "not written yet")],
)
def test_a_wrong_or_missing_lora_forward_is_refused_before_training(capsys, folder, said):
    assert capstone.main(["lora", "--assignments", str(ROOT / "assignments" / folder)]) == 1
    printed = capsys.readouterr().out
    assert said in printed and "see lesson 07" in printed and "Traceback" not in printed

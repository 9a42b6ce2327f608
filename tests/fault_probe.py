"""Fault probe: run every case against a tree and print one table row per case (issue 30's before/after
table in docs/fault_probe.md was made by it, against the commit before the issue and after).

    python tests/fault_probe.py TREE [--only SUBSTRING] > table.md

The cases are bash scripts in fault_cases_cli.py, fault_cases_lora.py and fault_cases_train.py; not a test
suite (tests/test_bad_inputs*.py keep every case), a tool to see what a tree does with bad input.

Each case is a bash script run in a fresh empty folder ($PWD) with: $PY (this Python), $TREE (the tree's
root, first on PYTHONPATH so `python -m qwenimage_minimal` and `import qwenimage_minimal` are that tree's),
$FIX (fixtures built once: $FIX/tiny a tiny Qwen-Image, $FIX/edit a tiny Edit-2509, $FIX/data four
captioned pictures, $FIX/lora a trained LoRA of $FIX/tiny). Recorded: the exit code and the last line the
case printed (its error message), and whatever the script echoes after `##` (effects it checked)."""

import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_cases_cli
import fault_cases_lora
import fault_cases_train

CASES = fault_cases_cli.CASES + fault_cases_lora.CASES + fault_cases_train.CASES


def build_fixtures(fix: Path, py: str, tree: str):
    if (fix / "done").exists():
        return
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {tree!r})
        from pathlib import Path
        from PIL import Image, ImageDraw
        from qwenimage_minimal import sizes
        fix = Path({str(fix)!r})
        sizes.write_checkpoint(fix / "tiny", "tiny")
        sizes.write_checkpoint(fix / "edit", "tiny", "QwenImageEditPlusPipeline")
        (fix / "data").mkdir(exist_ok=True)
        for name, rgb in {{"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}}.items():
            im = Image.new("RGB", (64, 64), (240, 240, 240)); ImageDraw.Draw(im).rectangle([16, 16, 48, 48], fill=rgb)
            im.save(fix / "data" / f"{{name}}.png"); (fix / "data" / f"{{name}}.txt").write_text(f"a {{name}} square")
    """)
    subprocess.run([py, "-c", code], check=True)
    subprocess.run(
        [
            py,
            "-m",
            "qwenimage_minimal",
            "train",
            "--model",
            str(fix / "tiny"),
            "--data",
            str(fix / "data"),
            "--out",
            str(fix / "lora_run"),
            "--resolution",
            "64",
            "--mixed_precision",
            "no",
            "--max_train_steps",
            "2",
            "--device",
            "cpu",
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": tree},
        capture_output=True,
    )
    (fix / "lora_run" / "lora.safetensors").rename(fix / "lora.safetensors")
    (fix / "done").write_text("")


def main():
    tree = str(Path(sys.argv[1]).resolve())
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    py = sys.executable
    fix = (
        Path(tempfile.gettempdir()) / f"fault_probe_fixtures_{hashlib.sha256(tree.encode()).hexdigest()[:10]}"
    )
    fix.mkdir(exist_ok=True)
    build_fixtures(fix, py, tree)
    env = {
        **os.environ,
        "PYTHONPATH": tree,
        "PY": py,
        "TREE": tree,
        "FIX": str(fix),
        "PYTHONWARNINGS": "default",
    }
    print("| case | exit | last line | effects |\n| --- | --- | --- | --- |")
    for label, script in CASES:
        if only not in label:
            continue
        with tempfile.TemporaryDirectory() as work:
            r = subprocess.run(
                ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600
            )
        lines = [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        effects = " ".join(line[2:].strip() for line in lines if line.startswith("##"))
        said = [line for line in lines if not line.startswith("##")]
        last = said[-1] if said else ""
        last = last.replace("|", "/")[:220]
        print(f"| {label} | {r.returncode} | {last} | {effects.replace('|', '/')} |", flush=True)


if __name__ == "__main__":
    main()

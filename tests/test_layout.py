"""The package's layout rules, checked: model files hold networks only, the command line holds no
fixtures, and nothing outside the package reaches into its private names or its command line."""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qwenimage_minimal"
MODEL_FILES = ["text_encoder.py", "vision.py", "vae.py", "mmdit.py"]
OUR_MODULES = r"(?:weights|tokenizer|text_encoder|vision|vae|mmdit|scheduler|prompts|images|sampling|pipeline|sizes)"


def code_of_notebook(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_hold_no_prompt_or_image_input_code(name):
    """No special-token text (templates), no PIL or numpy (pictures) in a model file's code."""
    tree = ast.parse((PACKAGE / name).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & {"PIL", "numpy"}, f"{name} imports {imported & {'PIL', 'numpy'}}: pictures go to images.py"
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr)}
    texts = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in docstrings]
    assert not [t for t in texts if "<|" in t], f"{name} carries chat-template text: prompts go to prompts.py"


def test_the_command_line_holds_only_the_command_line():
    """No checkpoint writing, no drawing, no model building in __main__.py: fixtures live in sizes.py."""
    source = (PACKAGE / "__main__.py").read_text()
    for fixture in ("write_safetensors", "state_dict", "ImageDraw", "manual_seed(0)", "def write_", "def test_picture"):
        assert fixture not in source, f"__main__.py carries {fixture!r}"


def test_nothing_imports_fixtures_from_the_command_line():
    """Benchmarks, tests, notebooks and the converter take fixtures from sizes.py; the command line's
    tests run it only through its main()."""
    users = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("notebooks/*.ipynb"), ROOT / "weights_convert.py"]
    for path in users:
        text = code_of_notebook(path) if path.suffix == ".ipynb" else path.read_text()
        if path.name == "test_layout.py":
            continue
        assert "__main__ import" not in text, path.name
        if "import __main__ as cli" in text:
            assert set(re.findall(r"\bcli\.(\w+)\(", text)) == {"main"}, path.name


@pytest.mark.parametrize("path", sorted(ROOT.glob("notebooks/*.ipynb")), ids=lambda p: p.name)
def test_notebooks_use_no_private_names(path):
    private = re.findall(rf"\b{OUR_MODULES}\._\w+", code_of_notebook(path))
    private += re.findall(r"\b(?:pipe|ours|ae|te|dit|tok|sch|tower)\._\w+\(", code_of_notebook(path))
    assert not private, f"{path.name} uses private names {private}"

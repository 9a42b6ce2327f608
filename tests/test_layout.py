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
OUR_MODULES = (
    r"(?:weights|tokenizer|text_encoder|vision|vae|mmdit|scheduler|prompts|images|sampling|pipeline|sizes)"
)


def code_of_notebook(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_hold_no_prompt_or_image_input_code(name):
    """No special-token text (templates), no PIL or numpy (pictures) in a model file's code."""
    tree = ast.parse((PACKAGE / name).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not imported & {"PIL", "numpy"}, (
        f"{name} imports {imported & {'PIL', 'numpy'}}: pictures go to images.py"
    )
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    texts = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]
    assert not [t for t in texts if "<|" in t], f"{name} carries chat-template text: prompts go to prompts.py"


def test_the_command_line_holds_only_the_command_line():
    """No checkpoint writing, no drawing, no model building in __main__.py: fixtures live in sizes.py."""
    source = (PACKAGE / "__main__.py").read_text()
    for fixture in (
        "write_safetensors",
        "state_dict",
        "ImageDraw",
        "manual_seed(0)",
        "def write_",
        "def test_picture",
    ):
        assert fixture not in source, f"__main__.py carries {fixture!r}"


def test_nothing_imports_fixtures_from_the_command_line():
    """Benchmarks, tests, notebooks and the converter take fixtures from sizes.py; the command line's
    tests run it only through its main()."""
    users = [
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("notebooks/*.ipynb"),
        ROOT / "weights_convert.py",
    ]
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


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (inside functions too), read from
    the source: `from . import x`, `from .x import y`, `from .. import x` in a subpackage. Dotted names
    relative to the package (`nano.scenes`); a subpackage's __init__ is the subpackage's name."""
    files = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    files.pop("__init__", None)  # the package's own (empty) __init__
    names = {f.removesuffix(".__init__") for f in files}
    graph = {}
    for file, path in files.items():
        name = file.removesuffix(".__init__")
        here = file.split(".")[:-1]  # the package the file is in, as parts
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:  # from . import x / from .x import y / from .. import x
                base = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "qwenimage_minimal":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # a module imported by name, else the one named
                whole, prefix = ".".join(base + [alias.name]), ".".join(base)
                target = whole if whole in names else prefix
                if target in names and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def test_the_package_has_no_import_cycle():
    graph = package_imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return seen

    cycles = sorted(m for m in graph if m in reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_module_map_matches_the_imports():
    """docs/architecture.md's module map has a row for every module of the package, and its 'depends on'
    column names exactly the package modules that the file imports (read from the source), so the map
    cannot drift from the code."""
    graph = package_imports()
    section = (
        (ROOT / "docs" / "architecture.md").read_text().split("## The module map", 1)[1].split("\n## ", 1)[0]
    )
    table = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[\w/]+\.py`", cells[0]) and cells[0] != "`weights_convert.py`":
            name = cells[0].strip("`").removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            table[name] = set(re.findall(r"`([\w.]+)`", cells[2]))
    assert set(table) == set(graph), (
        f"module map rows missing: {sorted(set(graph) - set(table))}; "
        f"rows of no module: {sorted(set(table) - set(graph))}"
    )
    for name, imported in graph.items():
        assert table[name] == imported, (
            f"{name}: the map says {sorted(table[name])}, the source imports {sorted(imported)}"
        )

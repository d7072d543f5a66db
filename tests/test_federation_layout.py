"""The federation and collab packages keep their shape: short functions, Flower only in the app
modules, and the federation never depending on CollabEdit."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedit"
PACKAGES = ("federation", "collab")
MAX_LINES = 80
# The only modules that may import Flower: the apps and the shared Flower helpers.
FLOWER_MODULES = ("federation/flower.py", "federation/app/", "collab/app/")


def _modules():
    for pkg in PACKAGES:
        yield from sorted((SRC / pkg).rglob("*.py"))


def functions_by_length(paths) -> list[tuple[int, str]]:
    """(lines, "file:function") of every function and method, nested ones included, longest first."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.name}"))
    return sorted(out, reverse=True)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_function_over_80_lines():
    long = [f"{name} ({n} lines)" for n, name in functions_by_length(_modules()) if n > MAX_LINES]
    assert not long, long


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(SRC)))
def test_flower_only_in_the_app_modules_and_federation_never_imports_collab(path):
    rel = str(path.relative_to(SRC))
    imports = _imports(path)
    if not rel.startswith(FLOWER_MODULES):
        assert not any(m == "flwr" or m.startswith("flwr.") for m in imports), f"{rel} imports Flower"
    if rel.startswith("federation/"):
        assert not any(m.startswith("fedit.collab") for m in imports), f"{rel} imports fedit.collab"


if __name__ == "__main__":  # python tests/test_federation_layout.py: the longest functions
    for n, name in functions_by_length(_modules())[:15]:
        print(f"{n:4d}  {name}")

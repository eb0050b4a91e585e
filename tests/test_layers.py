"""The layer rule (docs/models.md, "Where the code lives"), read from the source: file formats (evotune/checkpoint)
import no model, training or parallel code, and import evotune modules only at the top of a file
(a function-local import is how a cycle hides)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evotune"
ABOVE_FORMATS = ("evotune.model", "evotune.train", "evotune.parallel")


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])


def evotune_imports(source: str, package: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import of an evotune module in ``source``,
    a module of ``package`` (relative imports are resolved against it)."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names if name.split(".")[0] == "evotune"]
    return found


FORMAT_FILES = sorted((PACKAGE / "checkpoint").glob("*.py"))


@pytest.mark.parametrize("path", FORMAT_FILES, ids=lambda p: p.name)
def test_formats_import_nothing_above_them(path):
    bad = [(name, line) for name, line, _ in evotune_imports(path.read_text(), package_of(path)) if name.startswith(ABOVE_FORMATS)]
    assert bad == [], f"{path.relative_to(PACKAGE.parent)} imports a higher layer: {bad}"


@pytest.mark.parametrize("path", FORMAT_FILES + [PACKAGE / "model" / "load.py", PACKAGE / "model" / "internlm2.py",
                                                 PACKAGE / "convert.py", PACKAGE / "dtypes.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_evotune_imports_sit_at_the_top(path):
    local = [(name, line) for name, line, at_top in evotune_imports(path.read_text(), package_of(path))
             if not at_top]
    assert local == [], f"{path.relative_to(PACKAGE.parent)} imports evotune modules inside functions: {local}"


def test_the_checker_sees_function_local_and_relative_imports():
    """The two tests above can fail: a function-local relative import of the model is found as both."""
    source = "import os\nimport evotune.errors\n\ndef f():\n    from ..model import load\n    return load\n"
    assert evotune_imports(source, "evotune.checkpoint") == [
        ("evotune.errors", 2, True), ("evotune.model", 5, False), ("evotune.model.load", 5, False)]

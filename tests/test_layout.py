"""Project-wide invariants: the import floors (kernels <- veq <- server) and the packages."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"kernels": {"veq", "server"}, "veq": {"server"}, "server": set()}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_floors(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(_imported_roots(path) & FORBIDDEN[package])}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imported_roots(path) & FORBIDDEN[package]
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["veq", "kernels", "server"])
def test_packages_import_from_their_folders(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == ROOT / package
    assert module.__doc__

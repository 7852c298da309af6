"""Project-wide invariants: the import floors (kernels <- veq <- server), no import cycles, and
the packages (the wheel ships the library, not the development tools)."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "kernels": {"veq", "server", "refmodel"},
    "veq": {"server", "refmodel"},
    "server": {"refmodel"},
    "refmodel": {"server"},
}
PACKAGES = ("kernels", "veq", "server", "refmodel")


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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its body (function-level imports
    too: a lazy import hides a cycle from Python, not from the design)."""
    paths = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` mod.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names
                ]
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = _import_graph()
    assert "veq.calib.sources" in graph["veq.reference"]  # the graph sees real edges
    assert not _cycles(graph)


def test_cycle_detection_sees_lazy_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.slow
def test_wheel_ships_the_library_not_the_development_tools(tmp_path):
    """`pip install .` gets the packages and the bundled model, never `refmodel/` (trainer,
    card renderer) or the tests."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # A copy, so that setuptools' build/ neither lands in the checkout nor serves stale files.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests", "bench")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("veq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"veq", "kernels", "server"}, tops
    assert "veq/reference/mini/model.safetensors" in names
    assert {"veq/reference/evaluate.py", "veq/reference/quality.py"} <= names
    assert not {n for n in names if n.endswith(("/train.py", "/card.py"))}


def test_loading_a_checkpoint_imports_no_calibration_stack():
    """`veq.load` (and a server that only serves) never imports the pipeline or a solver."""
    import subprocess
    import sys

    code = (
        "import sys, veq.api, veq.checkpoint, veq.nn, server.loader\n"
        "heavy = ('veq.calib.pipeline', 'veq.calib.methods', 'veq.calib.gamma', "
        "'veq.algorithms', 'veq.stats')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""

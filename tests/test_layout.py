"""The package's import graph (read from the source with ``ast``): no cycles, and imports only run down the pipeline.

Layers, lowest first; a module may import its own layer and the layers below, never above:

    0  scfm.errors, scfm.resources          leaves
    1  scfm.encodings                       cells -> tokens (pure: no corpus code, no torch models)
    2  scfm.data                            corpus format, prepare, loader: hands cells to an encoding
    2  scfm.model                           parts and architectures: knows no data, no encodings, no CLI
    3  scfm.bundle, scfm.objectives, scfm.tasks, scfm.convert, scfm.training
    4  scfm.config                          validation and scale
    5  scfm.cli                             the console commands
    6  scfm (the top-level __init__)        the facade (``scfm.load_pretrained``)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scfm"
LAYERS = {"scfm.errors": 0, "scfm.resources": 0, "scfm.encodings": 1, "scfm.data": 2, "scfm.model": 2,
          "scfm.bundle": 3, "scfm.objectives": 3, "scfm.tasks": 3, "scfm.convert": 3, "scfm.training": 3,
          "scfm.config": 4, "scfm.cli": 5, "scfm": 6}
# pairs that must not meet although their layers allow it: the model knows no data and no encodings
APART = {("scfm.model", "scfm.data"), ("scfm.data", "scfm.model"), ("scfm.model", "scfm.encodings")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """scfm modules ``path`` imports anywhere in its source (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("scfm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scfm") and not node.level:
            for alias in node.names:  # `from scfm.data import corpus` imports the module scfm.data.corpus
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def layer(module: str) -> tuple[str, int]:
    """(the layer's package, its rank) of a module."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def test_every_module_has_a_layer():
    assert all(layer(m) for m in modules())


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_run_down_the_layers():
    wrong = []
    for src, targets in graph().items():
        src_pkg, src_rank = layer(src)
        for dst in targets:
            dst_pkg, dst_rank = layer(dst)
            if dst_rank > src_rank or (src_pkg, dst_pkg) in APART:
                wrong.append(f"{src} -> {dst} ({src_pkg} L{src_rank} imports {dst_pkg} L{dst_rank})")
    assert not wrong, "imports against the pipeline's direction:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_each_package_states_its_public_api(folder):
    init = PACKAGE / folder / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc) > 40, f"scfm/{folder}/__init__.py has no docstring stating the package's API"


def test_the_checker_catches_a_cycle_and_an_upward_import(tmp_path):
    """The rules themselves: a module of the model importing the CLI, and two modules importing each other."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from scfm.cli.train import main\nimport scfm.data.corpus\n")
    b.write_text("def f():\n    from scfm.data import corpus\n")
    known = {"scfm.data.corpus", "scfm.data", "scfm.cli.train"}
    assert imports(a, known) == {"scfm.cli.train", "scfm.data.corpus"}
    assert imports(b, known) == {"scfm.data.corpus"}
    assert layer("scfm.model.bert")[1] < layer("scfm.cli.train")[1]
    assert ("scfm.model", "scfm.data") in APART

"""The import layering of docs/architecture.md, checked on the source: targets → methods → harness → scripts
(a lower layer never imports a higher one), and no two modules import each other (imports inside functions
and under ``TYPE_CHECKING`` count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("targets", "methods", "harness", "scripts")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Repository modules imported anywhere in ``path`` (``from pkg import mod`` resolves to ``pkg.mod``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            while n and n not in modules:  # the longest prefix that is a repository module
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for layer in LAYERS for p in (REPO / layer).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def test_the_scan_sees_the_known_edges() -> None:
    g = _graph()
    assert "targets.base" in g["targets.lennard_jones"]
    assert "targets.reference_data" in g["targets.base"]  # a lazy import inside a method
    assert "harness.metrics" in g["harness.tables"]


@pytest.mark.parametrize("lower", LAYERS[:-1])
def test_a_lower_layer_never_imports_a_higher_one(lower: str) -> None:
    higher = LAYERS[LAYERS.index(lower) + 1:]
    bad = sorted(
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if m.split(".")[0] == lower
        for d in deps
        if d.split(".")[0] in higher
    )
    assert not bad, bad


def test_no_two_modules_import_each_other() -> None:
    g = _graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in g.items() for b in deps if a in g.get(b, set())})
    # a package's __init__ re-exporting its own submodules is not a cycle between two files of code
    pairs = [(a, b) for a, b in pairs if not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert not pairs, pairs

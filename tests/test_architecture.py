"""The package's imports run one way: each module imports only from layers below its own.

The layers follow the pipeline (`load → validate → merge → model → check →
lower → emit → publish | serve`), with the leaves everyone uses at the bottom:
`emit` owns the types it serialises and imports nothing from the compiler, and
the xDS wire contract (type URLs, the version rule, the consistency check, the
strict parse) is shared by the Envoy target and the server from below both.
The server never imports the model or the targets (it reads emitted files).
Imports are read from the source with `ast`, lazy (function-level) ones
included, so an import hidden in a function cannot close a cycle either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "compiler"

#: Layer of each module (or package prefix, which covers the modules below it); a module
#: imports from lower layers, and from its own only inside its own package.
LAYERS: list[tuple[str, ...]] = [
    ("compiler", "compiler.__main__"),  # the package face, and `python -m compiler`, see TOP
    ("compiler.errors", "compiler.emit", "compiler.values", "compiler.diagnostics"),
    ("compiler.xds.resources", "compiler.xds.consistency", "compiler.xds.protos", "compiler.xds"),
    ("compiler.load",),
    ("compiler.schema",),
    ("compiler.overlay",),
    ("compiler.model",),
    ("compiler.build",),
    ("compiler.check",),
    ("compiler.targets",),  # and every module below it
    ("compiler.cache", "compiler.workers"),
    ("compiler.validate",),
    ("compiler.units",),
    ("compiler.pipeline",),
    ("compiler.gitops", "compiler.xds.server"),  # publish | serve, and the xDS server's other modules
    ("compiler.cli",),
]
TOP = {"compiler.__main__"}  # imports the CLI: above everything
#: Below the top layers, the xDS server's modules (everything under compiler.xds but the wire contract).
XDS_WIRE = {"compiler.xds", "compiler.xds.resources", "compiler.xds.consistency", "compiler.xds.protos"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every compiler module `name` imports, resolved to a module (not a name inside one)."""
    known = _modules()
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "compiler" or t.startswith("compiler."))
    found.discard(name)
    return found


def _layer(name: str) -> int:
    if name in TOP:
        return len(LAYERS)
    if name.startswith("compiler.xds.") and name not in XDS_WIRE:
        return next(i for i, layer in enumerate(LAYERS) if "compiler.xds.server" in layer)
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if name == prefix or (name.startswith(prefix + ".") and prefix not in ("compiler", "compiler.xds")):
                best = i
    assert best is not None, f"{name} has no layer: add it to LAYERS"
    return best


GRAPH = {name: _imports(name, path) for name, path in _modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_go_down(name):
    upward = sorted(t for t in GRAPH[name] if _layer(t) > _layer(name))
    assert upward == [], f"{name} (layer {_layer(name)}) imports from above: {upward}"


def test_same_layer_imports_are_within_one_package():
    """Modules of one layer may import each other only inside one package (a target's modules,
    the xDS server's modules, the gitops package)."""
    strays = []
    for name, targets in GRAPH.items():
        for t in targets:
            if _layer(t) == _layer(name) and name.split(".")[:2] != t.split(".")[:2]:
                if not (name.startswith("compiler.xds") and t.startswith("compiler.xds")):
                    strays.append(f"{name} → {t}")
    assert strays == []


def test_no_import_cycle():
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            cycles.append(" → ".join(trail[trail.index(node):] + [node]))
            return
        visiting.add(node)
        for nxt in sorted(GRAPH.get(node, ())):
            visit(nxt, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(GRAPH):
        visit(name, [])
    # A package importing its own submodules (`from compiler.targets.envoy import clusters`) is
    # how a package face works; that is not a cycle unless a submodule imports the face back.
    assert cycles == []


def test_emit_is_a_leaf():
    assert GRAPH["compiler.emit"] == set()


def test_serving_never_imports_the_model_or_the_targets():
    xds = [n for n in GRAPH if n == "compiler.xds" or n.startswith("compiler.xds.")]
    bad = sorted(f"{n} → {t}" for n in xds for t in GRAPH[n]
                 if t in ("compiler.model", "compiler.pipeline", "compiler.units") or t.startswith("compiler.targets"))
    assert bad == []


def test_the_checker_would_see_an_upward_import(tmp_path):
    """A negative control: the same reading finds an import that goes up."""
    fake = tmp_path / "compiler" / "emit.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from compiler.pipeline import compile_source\n")
    assert "compiler.pipeline" in _imports("compiler.emit", fake)

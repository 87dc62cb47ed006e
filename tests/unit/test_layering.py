"""The layout is the architecture: imports between the folders of the package follow the data
flow (config -> data -> models -> losses -> negatives -> methods -> train -> export -> eval).

Every import statement of every module is read from its source, those inside functions and
``if TYPE_CHECKING`` blocks included, and resolved to the module it names
(``from dist_contrast.train import checkpoint`` names ``dist_contrast.train.checkpoint``)."""

from __future__ import annotations

import ast
from pathlib import Path

import dist_contrast

PACKAGE = Path(dist_contrast.__file__).resolve().parent

# folder -> folders (and top-level modules) of the package it must not import
FORBIDDEN = {
    "config": {"data", "models", "losses", "negatives", "methods", "train", "eval", "export"},
    "losses": {"data", "models", "negatives", "methods", "train", "eval", "export"},
    "negatives": {"data", "models", "methods", "train", "eval", "export"},
    "data": {"models", "losses", "negatives", "methods", "train", "eval", "export"},
    "methods": {"train", "eval", "export"},
    "train": {"eval", "export"},
    "export": {"eval"},
}
# models/ may import only itself and errors
MODELS_MAY_IMPORT = {"models", "errors"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules that ``path`` (module ``name``) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import submodule` names the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    root = name.split(".")[0]
    return {m for m in found if m == root or m.startswith(root + ".")} - {name}


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def folder(module: str) -> str:
    """``dist_contrast.losses.kernels.tiled`` -> ``losses``; top-level modules by name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        here = folder(mod)
        for dep in sorted(deps):
            there = folder(dep)
            if here == "models" and there not in MODELS_MAY_IMPORT:
                out.append(f"{mod} imports {dep}: models/ imports only models/ and errors")
            elif there in FORBIDDEN.get(here, ()):
                out.append(f"{mod} imports {dep}: {here}/ must not import {there}/")
    return out


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_imports_follow_the_layers():
    assert layer_violations(import_graph(PACKAGE)) == []


def test_the_checks_see_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "dist_contrast"
    for sub in ("models", "losses", "methods"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from dist_contrast import losses\n")
    (pkg / "losses" / "b.py").write_text("from ..methods import c\n")
    (pkg / "methods" / "c.py").write_text("import dist_contrast.losses.b\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["dist_contrast.losses.b", "dist_contrast.methods.c"]]
    assert layer_violations(graph) == [
        "dist_contrast.losses.b imports dist_contrast.methods.c: losses/ must not import methods/",
        "dist_contrast.models.a imports dist_contrast.losses: models/ imports only models/ and "
        "errors",
    ]

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


# ---- the bench package, loaded by name --------------------------------------------------------

BENCH = "dist_contrast_bench"  # bench/, installed beside the package; only the CLI may load it


def _prefix(node: ast.AST, names: dict[str, ast.AST]) -> str:
    """The text a module-name expression starts with: a string, a name bound to one, or an
    f-string's leading parts (``f"{BENCH_PACKAGE}.{name}"`` -> ``dist_contrast_bench.``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return _prefix(names.pop(node.id), names)  # popped: a name bound to itself ends
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                part = part.value
            piece = _prefix(part, names)
            text += piece
            if not piece:
                break
        return text
    return ""


def dynamic_imports(path: Path) -> set[str]:
    """Module names ``path`` loads through ``importlib.import_module`` or ``__import__``, which
    an import statement check cannot see, as far as they are spelled out in the module."""
    tree = ast.parse(path.read_text())
    names = {
        target.id: node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if called in ("import_module", "__import__"):
                found.add(_prefix(node.args[0], dict(names)))
    return found


def bench_users(root: Path) -> set[str]:
    """Modules of the package that import the bench package, by statement or by name."""
    users = set()
    for name, path in modules(root).items():
        statements = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                statements.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                statements.add(node.module or "")
        if any(m.split(".")[0] == BENCH for m in statements | dynamic_imports(path)):
            users.add(name)
    return users


def test_only_the_cli_loads_the_bench_package():
    """The library never depends on the benchmarks; the CLI's `bench` command loads them by
    name (``importlib``), which the layer checks above cannot see."""
    assert bench_users(PACKAGE) == {"dist_contrast.cli"}


def test_the_bench_check_sees_loads_by_name(tmp_path):
    pkg = tmp_path / "dist_contrast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        'import importlib\nPKG = "dist_contrast_bench"\n\n'
        'def f(n):\n    full = f"{PKG}.{n}"\n    return importlib.import_module(full)\n'
    )
    (pkg / "b.py").write_text('def g():\n    return __import__("dist_contrast_bench.x")\n')
    (pkg / "c.py").write_text("from dist_contrast_bench import plan\n")
    (pkg / "d.py").write_text('import importlib\nimportlib.import_module("json")\n')
    assert bench_users(pkg) == {"dist_contrast.a", "dist_contrast.b", "dist_contrast.c"}

"""The import graph holds the layering in ``tests/import_layers.toml``: no cycle between files, and
each part imports only the parts it may. Run as a script for the counts:
``python tests/test_imports.py [SRC_DIR]`` prints files, edges, cycles and cross-part violations as JSON.
"""

from __future__ import annotations

import ast
import json
import sys
import tomllib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
LAYERS = Path(__file__).with_name("import_layers.toml")


def module_name(path: Path, src: Path) -> str:
    parts = ("lorakit", *path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, here: str, is_package: bool, known: set[str]) -> set[str]:
    """lorakit modules this file imports at run time (any depth; `if TYPE_CHECKING:` blocks skipped)."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and node in getattr(tree, "body", []):
            continue  # a module's PEP 562 __getattr__ runs on attribute access, not at import
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".") if is_package else here.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
        stack.extend(ast.iter_child_nodes(node))
    # importing a.b.c runs a.b's __init__ first, unless a.b is this file's own (already running) package
    own = {".".join(here.split(".")[:i]) for i in range(1, here.count(".") + 2)}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
    return {m for m in found | (parents - own) if m in known and m != here}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    files = {module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    known = set(files)
    graph = {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", known) for m, p in files.items()}
    for m, p in files.items():  # a registry folder imports every file below it (lorakit.registry.import_entries)
        if p.name == "__init__.py" and "import_entries(__name__, __path__" in p.read_text():
            graph[m] |= {k for k in known if k.startswith(m + ".") and not k.rsplit(".", 1)[-1].startswith("_")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:  # noqa: C901 - Tarjan's algorithm in one piece
    """Strongly connected components with more than one file (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def part_of(module: str, parts: dict[str, dict]) -> str:
    """The part whose longest module prefix matches ``module``."""
    best, length = "", -1
    for part, spec in parts.items():
        for prefix in spec["modules"]:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = part, len(prefix)
    if not best:
        raise AssertionError(f"{module} belongs to no part of {LAYERS.name}; add it there")
    return best


def violations(graph: dict[str, set[str]], parts: dict[str, dict]) -> list[str]:
    """'a -> b (part x may not import part y)' for every edge the layering forbids."""
    bad = []
    for a, targets in sorted(graph.items()):
        pa = part_of(a, parts)
        for b in sorted(targets):
            pb = part_of(b, parts)
            if pb != pa and pb not in parts[pa]["may_import"]:
                bad.append(f"{a} -> {b} (part {pa} may not import part {pb})")
    return bad


def report(src: Path = SRC) -> dict[str, object]:
    graph = import_graph(src)
    parts = tomllib.loads(LAYERS.read_text())
    found = cycles(graph)
    cross = [(a, b) for a, ts in graph.items() for b in ts if part_of(a, parts) != part_of(b, parts)]
    return {
        "files": len(graph),
        "edges": sum(map(len, graph.values())),
        "cycles": len(found),
        "files_in_cycles": sum(map(len, found)),
        "largest_cycle": max(map(len, found), default=0),
        "cross_part_edges": len(cross),
        "forbidden_edges": len(violations(graph, parts)),
    }


def test_no_import_cycle_between_files():
    found = cycles(import_graph())
    assert found == [], f"import cycles (each a set of files that import each other): {found}"


def test_every_part_imports_only_what_the_layering_allows():
    parts = tomllib.loads(LAYERS.read_text())
    for part, spec in parts.items():
        unknown = set(spec["may_import"]) - set(parts)
        assert not unknown, f"{LAYERS.name}: part {part} may import unknown parts {unknown}"
    assert violations(import_graph(), parts) == []


def test_the_light_core_loads_no_method_and_no_transformers():
    import subprocess

    code = "import sys, lorakit.lowrank; print(sorted(m for m in sys.modules if m.startswith(('lorakit.', 'trans'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["lorakit.errors", "lorakit.lowrank"]


if __name__ == "__main__":
    print(json.dumps(report(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC), indent=1))

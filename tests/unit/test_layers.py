"""The package's import arrows (README "Layout"): cli -> manager | instance | launch ->
engine | wire | tpm, with the shared modules at the bottom; the verifier imports no daemon
code; and no module imports itself back through others (no import cycle anywhere, imports
under `if TYPE_CHECKING:` and inside functions counted). Every import in every module is read."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vtpm"
BASE = {
    "endpoints",
    "errors",
    "files",
    "instanceargs",
    "labels",
    "labelpolicy",
    "listen",
    "launchrecord",
    "serving",
}

# what each part may import besides itself
ALLOWED: dict[str, set[str]] = {
    "manager": {"wire", "tpm", "platform"} | BASE,
    "instance": {"engine", "wire", "tpm"} | BASE,
    "launch": {"wire", "tpm", "platform"} | BASE,
    "compat": {"wire", "tpm", "endpoints", "errors", "files", "listen"},
    "engine": {"tpm", "errors"},
    "wire": {"tpm", "errors", "endpoints"},
    "tpm": {"errors"},
    "verify": {"tpm", "wire", "errors", "files", "labels"},
    "platform": {"errors", "files"},
    "errors": set(),
    "files": {"errors"},
    "labels": {"errors"},
    "endpoints": {"errors"},
    "instanceargs": {"endpoints", "errors"},
    "listen": {"errors", "endpoints"},
    "labelpolicy": {"errors", "labels", "listen"},
    "serving": {"errors", "wire"},
    "launchrecord": {"errors", "files", "tpm"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_names(path: Path, top: str = "vtpm") -> set[str]:
    """Every `top...` name the module imports, anywhere in it (a `from X import y` gives both
    X and X.y: y may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == top or n.startswith(top + ".")}


def _imported_parts(path: Path) -> set[str]:
    return {n.split(".")[1] for n in _imported_names(path) if n.count(".") >= 1} & (
        set(ALLOWED) | {"cli"}
    )


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module name -> the modules of the tree under `root` (a package named root.name) that
    it imports."""
    modules: dict[str, Path] = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = p
    graph: dict[str, set[str]] = {}
    for name, p in modules.items():
        deps = set()
        for imported in _imported_names(p, root.name):
            if imported in modules and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if _part(p) in ALLOWED)


def test_every_part_is_placed() -> None:
    parts = {_part(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert parts - {"cli"} <= set(ALLOWED), "a new part of the package needs a place here"


def test_imports_point_downward() -> None:
    wrong = []
    for path in MODULES:
        part = _part(path)
        bad = _imported_parts(path) - ALLOWED[part] - {part}
        if bad:
            wrong.append(f"{path.relative_to(SRC)} ({part}) imports {sorted(bad)}")
    assert len(MODULES) > 50
    assert not wrong


def test_no_import_cycle_in_the_tree() -> None:
    graph = module_graph(SRC)
    assert len(graph) > 50
    assert import_cycles(graph) == []


def test_the_cycle_check_sees_a_cycle_behind_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n"
    )
    (pkg / "sub" / "c.py").write_text("def f():\n    from pkg.sub.b import thing\n")
    (pkg / "d.py").write_text("import pkg.e\n")
    (pkg / "e.py").write_text("def g():\n    import pkg.d\n")
    cycles = import_cycles(module_graph(pkg))
    assert cycles == [["pkg.d", "pkg.e"], ["pkg.sub.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("thing = 1\n")
    (pkg / "e.py").write_text("")
    assert import_cycles(module_graph(pkg)) == []

"""The package's import arrows (README "Layout"): cli -> manager | instance | launch ->
engine | wire | tpm, with the shared modules at the bottom; the verifier imports no daemon
code. Every import in every module is read, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vtpm"
BASE = {"errors", "files", "labels", "listen", "launchrecord", "serving"}

# what each part may import besides itself
ALLOWED: dict[str, set[str]] = {
    "manager": {"wire", "tpm", "platform"} | BASE,
    "instance": {"engine", "wire", "tpm"} | BASE,
    "launch": {"wire", "tpm", "platform"} | BASE,
    "engine": {"tpm", "errors"},
    "wire": {"tpm", "errors"},
    "tpm": {"errors"},
    "verify": {"tpm", "wire", "errors", "files"},
    "platform": {"errors", "files"},
    "errors": set(),
    "files": {"errors"},
    "labels": {"errors", "listen"},
    "listen": {"errors"},
    "serving": {"errors", "wire"},
    "launchrecord": {"errors", "files", "tpm"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "vtpm":
                names.update(f"vtpm.{a.name}" for a in node.names)
    return {n.split(".")[1] for n in names if n.startswith("vtpm.")}


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

"""The house rule: every import runs downward.

Floors: the competition's contract (``competition``) and ``rerank`` at the ground, then
``backbones``, ``ensemble``, ``tuning``, and ``main`` / ``bench`` on top. A module may import
its own package and the packages on lower floors; the two ground-floor packages import
nothing else of the kit. Imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"competition": 0, "rerank": 0, "backbones": 1, "ensemble": 2, "tuning": 3, "main": 4, "bench": 4}


def _kit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level kit package) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in FLOORS]
    return found


def _modules() -> list[tuple[str, Path]]:
    mods = [(pkg, f) for pkg in FLOORS if (ROOT / pkg).is_dir() for f in sorted((ROOT / pkg).rglob("*.py"))]
    return mods + [("main", ROOT / "main.py")]


def upward_imports() -> list[str]:
    """Every import that runs up a floor, or sideways between the two ground-floor packages."""
    bad = []
    for pkg, f in _modules():
        for line, target in _kit_imports(f):
            if target == pkg:
                continue
            if FLOORS[target] > FLOORS[pkg] or (FLOORS[pkg] == 0 and FLOORS[target] == 0):
                bad.append(f"{f.relative_to(ROOT)}:{line} ({pkg}, floor {FLOORS[pkg]}) imports {target} "
                           f"(floor {FLOORS[target]})")
    return bad


def test_every_import_runs_downward():
    assert upward_imports() == []


def test_the_checker_sees_upward_imports(tmp_path):
    bad = tmp_path / "up.py"
    bad.write_text("def f():\n    from tuning.search import run_search\n    import ensemble.model\n")
    assert [t for _, t in _kit_imports(bad)] == ["tuning", "ensemble"]


@pytest.mark.parametrize("pkg", ["competition", "rerank", "ensemble", "tuning"])
def test_package_faces_state_their_contract(pkg):
    module = __import__(pkg)
    assert module.__doc__ and len(module.__doc__.split()) > 20
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)

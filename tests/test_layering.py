"""Packages import only downward: common, utils < dataset < models < runners < main.py,
and common and utils never import each other in a circle."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANK = {"common": 0, "utils": 0, "dataset": 1, "models": 2, "runners": 3}


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def package_edges():
    edges = {}
    for pkg in RANK:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for name in imports_of(path):
                top = name.split(".")[0]
                if top in RANK and top != pkg:
                    edges.setdefault((pkg, top), []).append(f"{path.relative_to(REPO)} imports {name}")
    return edges


def test_packages_import_only_downward():
    edges = package_edges()
    upward = [where for (src, dst), places in edges.items() if RANK[dst] > RANK[src] for where in places]
    assert not upward, upward
    assert not (("common", "utils") in edges and ("utils", "common") in edges), \
        (edges.get(("common", "utils")), edges.get(("utils", "common")))
    assert ("runners", "models") in edges and ("models", "common") in edges   # the walk sees real edges


def test_nothing_imports_main():
    for pkg in RANK:
        for path in (REPO / pkg).rglob("*.py"):
            assert "main" not in {n.split(".")[0] for n in imports_of(path)}, path

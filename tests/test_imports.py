"""The library's layout shows its architecture: no import circles, and no
import from a later stage of the workflow into an earlier one.

Read from the source (every import statement, those under TYPE_CHECKING and
inside functions included: a deferred import is still a dependency), not by
importing, so the test sees exactly what a reader sees."""

import ast
from pathlib import Path

import pytest

from kdflow import STAGES
from tests.helpers.workflow import REPO

LIBRARY = REPO / "kdflow"


def module_name(path: Path, root: Path = LIBRARY) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def kdflow_imports(path: Path, root: Path = LIBRARY) -> set[str]:
    """The kdflow modules that `path` imports (a `from kdflow.x import name`
    counts as kdflow.x.name when that is a module, else as kdflow.x)."""
    known = {module_name(p, root) for p in root.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kdflow"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "kdflow":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m in known} - {"kdflow"}


def graph(root: Path = LIBRARY) -> dict[str, set[str]]:
    return {module_name(p, root): kdflow_imports(p, root) for p in root.rglob("*.py")}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's members (Tarjan's strongly connected components)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
            if len(comp) > 1 or v in g.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in STAGES:
        raise AssertionError(f"{module}: every module lives in a subpackage of kdflow.STAGES")
    return STAGES.index(parts[1])


def backward(g: dict[str, set[str]]) -> list[str]:
    return [f"{a} (stage {STAGES[stage(a)]}) imports {b} (later stage {STAGES[stage(b)]})"
            for a, deps in sorted(g.items()) if a.count(".") > 1
            for b in sorted(deps) if b.count(".") >= 1 and stage(b) > stage(a)]


def test_the_library_has_no_import_circle():
    assert circles(graph()) == []


def test_no_module_imports_from_a_later_stage():
    assert backward(graph()) == []


def test_every_subpackage_is_a_stage_and_every_stage_a_subpackage():
    subs = {d.name for d in LIBRARY.iterdir() if (d / "__init__.py").is_file()}
    assert subs == set(STAGES)
    loose = sorted(p.name for p in LIBRARY.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside a stage's subpackage: {loose}"


@pytest.fixture
def tiny_library(tmp_path):
    root = tmp_path / "kdflow"
    for sub in ("core", "data", "train"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    return root


def test_the_checks_find_a_circle_and_a_backward_import(tiny_library):
    # The checks themselves can fail: a made-up library with both defects.
    (tiny_library / "core" / "a.py").write_text("from kdflow.data import b\n")
    (tiny_library / "data" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kdflow.core.a import x\n")
    (tiny_library / "train" / "c.py").write_text("def f():\n    import kdflow.data.b\n")
    g = graph(tiny_library)
    assert g["kdflow.core.a"] == {"kdflow.data.b"}
    assert g["kdflow.train.c"] == {"kdflow.data.b"}
    assert circles(g) == [["kdflow.core.a", "kdflow.data.b"]]
    assert backward(g) == ["kdflow.core.a (stage core) imports kdflow.data.b (later stage data)"]

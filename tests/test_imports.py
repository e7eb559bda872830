"""The library's layout shows its architecture: no import circles, and no
import from a later stage of the workflow into an earlier one; and the test
suite's: no test module imports another (what they share is in tests/helpers/).

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



# Evaluation, export and the report read what training wrote (checkpoints,
# metrics); inference and device set-up live below training (kdflow.models,
# kdflow.core), so scoring a model never needs the training package.
READERS_OF_TRAINING = ("kdflow.analysis", "kdflow.deploy")


def test_analysis_and_deploy_do_not_import_the_training_package():
    g = graph()
    found = sorted(f"{a} imports {b}" for a, deps in g.items()
                   if a.startswith(READERS_OF_TRAINING)
                   for b in deps if b == "kdflow.train" or b.startswith("kdflow.train."))
    assert found == []

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


# ---------------------------------------------------------------------------
# Test modules import shared code from tests/helpers/, not from each other
# ---------------------------------------------------------------------------

TESTS = REPO / "tests"
# Left for the owner of these files to switch (the helpers they share go to
# tests/helpers/): (importer, imported).
NOT_YET: set[tuple[str, str]] = set()


def imported_test_modules(path: Path, tests: Path = TESTS) -> set[str]:
    """The test modules of `tests` (by name: test_x) that `path` imports:
    `import tests.test_x`, `from tests.test_x import ...`, `from tests import
    test_x`, their relative forms, a bare `import test_x`, and
    importlib.import_module / __import__ of such a name; deferred imports too."""
    known = {p.stem for p in tests.glob("test_*.py")}
    package = tests.name

    def module(dotted: str) -> set[str]:
        parts = dotted.split(".")
        if len(parts) >= 2 and parts[0] == package:
            return {parts[1]} & known
        return {parts[0]} & known if len(parts) == 1 else set()

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                found |= module(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found |= module(node.module)
                base = node.module
            elif node.level == 1:  # from within the tests package
                found |= {node.module.split(".")[0]} & known if node.module else set()
                base = package if node.module is None else None
            else:
                base = None
            if base == package:  # from tests import test_x
                found |= {a.name for a in node.names} & known
        elif isinstance(node, ast.Call) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("import_module", "__import__"):
                found |= module(node.args[0].value)
    return found - {path.stem}


def cross_imports(tests: Path = TESTS) -> set[tuple[str, str]]:
    return {(p.stem, m) for p in sorted(tests.glob("test_*.py"))
            for m in imported_test_modules(p, tests)}


def test_no_test_module_imports_another():
    found = cross_imports()
    assert found - NOT_YET == set(), (
        "test modules importing other test modules (move what they share to tests/helpers/): "
        + ", ".join(f"{a} imports {b}" for a, b in sorted(found - NOT_YET)))


def test_the_check_finds_every_form_of_import_between_test_modules(tmp_path):
    tests = tmp_path / "tests"
    (tests / "helpers").mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "helpers/__init__.py", "helpers/losses.py",
                 "test_base.py"):
        (tests / name).write_text("")
    forms = {
        "test_a.py": "from tests.test_base import rows\n",
        "test_b.py": "import tests.test_base as base\n",
        "test_c.py": "def f():\n    from tests import conftest, test_base\n",
        "test_d.py": "from .test_base import rows\n",
        "test_e.py": "from . import test_base\n",
        "test_f.py": "import importlib\nbase = importlib.import_module('tests.test_base')\n",
        "test_g.py": "import test_base\n",
    }
    for name, code in forms.items():
        (tests / name).write_text(code)
    fine = ("from tests.conftest import REPO\nfrom tests.helpers.losses import rows\n"
            "from tests import helpers\nimport tests.helpers.childmem\nfrom tests.test_ok import x\n"
            "from .helpers import losses\nimport pytest\n")
    (tests / "test_ok.py").write_text(fine.replace("from tests.test_ok import x\n", ""))
    (tests / "test_z.py").write_text(fine.replace("test_ok", "test_missing"))
    assert cross_imports(tests) == {(Path(n).stem, "test_base") for n in forms}

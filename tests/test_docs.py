"""The README's module map is the modules' own docstrings, so it cannot go stale."""

import ast
import re

from kdflow.workflow import docs
from tests.conftest import REPO

LIBRARY = REPO / "kdflow"


def test_every_module_has_a_one_sentence_docstring_first_line():
    for path in sorted(LIBRARY.rglob("*.py")):
        line = docs.summary(path)
        assert line.endswith("."), f"{path}: docstring first line {line!r} is no sentence"
        assert ast.get_docstring(ast.parse(path.read_text())).splitlines()[0] == line


def test_the_readme_lists_every_module_and_subpackage_with_its_docstring_first_line():
    readme = (REPO / "README.md").read_text()
    section = readme.split(docs.BEGIN)[1].split(docs.END)[0]
    listed = dict(re.findall(r"^\| \*{0,2}`kdflow/([\w/.]+)`\*{0,2} \| (.*) \|$", section, re.M))
    files = {}
    for p in LIBRARY.rglob("*.py"):
        rel = p.relative_to(LIBRARY).as_posix()
        if rel == "__init__.py":
            continue
        files[rel.removesuffix("__init__.py")] = docs.summary(p)
    assert sorted(listed) == sorted(files), "run python -m kdflow.workflow.docs --write README.md"
    for name, line in files.items():
        assert listed[name] == line.replace("|", r"\|"), (
            f"{name}: README says {listed[name]!r}, the docstring {line!r}; "
            "run python -m kdflow.workflow.docs --write README.md")
    assert docs.rewrite(readme) == readme
    # Subpackages appear in the workflow's order, each above its modules.
    order = [n.rstrip("/") for n in listed if n.endswith("/")]
    from kdflow import STAGES
    assert order == [s for s in STAGES if s in order] and set(order) == set(STAGES)


def test_a_new_module_enters_the_map(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text('"""Stage 1."""\n')
    (tmp_path / "data" / "fetch.py").write_text('"""Download an archive | verify it."""\n')
    new = docs.rewrite(f"intro\n{docs.BEGIN}\nold\n{docs.END}\noutro\n", tmp_path)
    assert new == (f"intro\n{docs.BEGIN}\n| module | what it is |\n|---|---|\n"
                   "| **`kdflow/data/`** | Stage 1. |\n"
                   f"| `kdflow/data/fetch.py` | Download an archive \\| verify it. |\n{docs.END}\noutro\n")

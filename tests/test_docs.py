"""The README's module map is the modules' own docstrings, so it cannot go stale."""

import ast
import re

from kdflow import docs
from tests.conftest import REPO


def test_every_module_has_a_one_sentence_docstring_first_line():
    for path in sorted((REPO / "kdflow").glob("*.py")):
        line = docs.summary(path)
        assert line.endswith("."), f"{path.name}: docstring first line {line!r} is no sentence"
        assert ast.get_docstring(ast.parse(path.read_text())).splitlines()[0] == line


def test_the_readme_lists_every_module_with_its_docstring_first_line():
    readme = (REPO / "README.md").read_text()
    section = readme.split(docs.BEGIN)[1].split(docs.END)[0]
    listed = dict(re.findall(r"^\| `kdflow/(\w+\.py)` \| (.*) \|$", section, re.M))
    modules = {p.name: docs.summary(p) for p in (REPO / "kdflow").glob("*.py")
               if p.name != "__init__.py"}
    assert sorted(listed) == sorted(modules), "run python -m kdflow.docs --write README.md"
    for name, line in modules.items():
        assert listed[name] == line.replace("|", r"\|"), (
            f"{name}: README says {listed[name]!r}, the docstring {line!r}; "
            "run python -m kdflow.docs --write README.md")
    assert docs.rewrite(readme) == readme


def test_a_new_module_enters_the_map(tmp_path):
    (tmp_path / "fetch.py").write_text('"""Download an archive | verify it."""\n')
    new = docs.rewrite(f"intro\n{docs.BEGIN}\nold\n{docs.END}\noutro\n", tmp_path)
    assert new == (f"intro\n{docs.BEGIN}\n| module | what it is |\n|---|---|\n"
                   f"| `kdflow/fetch.py` | Download an archive \\| verify it. |\n{docs.END}\noutro\n")

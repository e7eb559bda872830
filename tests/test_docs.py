"""The docs cannot go stale: their generated parts are regenerated and
compared, their results tree is checked against the rules' outputs, and
every command in their code blocks is dry-run.

- The module map (docs/development.md) is the modules' own docstrings.
- The config reference (config/README.md) names every key of
  config/schema.yaml with its schema default; what a change reruns comes
  from that page's reruns table, whose keys must be schema keys.
- The results tree (docs/results.md) lists every output, log and benchmark
  path of dry runs of the default experiment, a shared and fine-tuned
  teacher with a subset and confirmation seeds, and an imported teacher, and
  nothing else but the files a job leaves while it runs.
- Every command in a ```bash block of README.md, config/README.md and
  docs/*.md runs: `make run ARGS=...` as the `snakemake -n` it starts, with
  the same options, in a temporary directory; `.venv/bin/snakemake ...` with
  `-n` added; commands that cannot be dry-run are listed in EXCEPTIONS, with
  why, and are checked as far as that goes (the make target exists, the
  script and its options exist); `--sdm conda` is left out where conda is
  not installed.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from kdflow.core import schema as _schema
from kdflow.workflow import docs
from kdflow.workflow.config import validate
from tests.conftest import REPO, SNAKEMAKE, local_env, snakemake

LIBRARY = REPO / "kdflow"
PAGES = [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------
# The module map
# ---------------------------------------------------------------------------

def test_every_module_has_a_one_sentence_docstring_first_line():
    for path in sorted(LIBRARY.rglob("*.py")):
        line = docs.summary(path)
        assert line.endswith("."), f"{path}: docstring first line {line!r} is no sentence"
        assert ast.get_docstring(ast.parse(path.read_text())).splitlines()[0] == line


def test_the_module_map_lists_every_module_and_subpackage_with_its_docstring_first_line():
    page = (REPO / docs.MODULE_MAP_PAGE).read_text()
    section = page.split(docs.BEGIN)[1].split(docs.END)[0]
    listed = dict(re.findall(r"^\| \*{0,2}`kdflow/([\w/.]+)`\*{0,2} \| (.*) \|$", section, re.M))
    files = {}
    for p in LIBRARY.rglob("*.py"):
        rel = p.relative_to(LIBRARY).as_posix()
        if rel == "__init__.py":
            continue
        files[rel.removesuffix("__init__.py")] = docs.summary(p)
    assert sorted(listed) == sorted(files), "run `make docs`"
    for name, line in files.items():
        assert listed[name] == line.replace("|", r"\|"), (
            f"{name}: {docs.MODULE_MAP_PAGE} says {listed[name]!r}, the docstring {line!r}; "
            "run `make docs`")
    assert docs.rewrite(page) == page
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


def test_make_docs_finds_every_generated_block_up_to_date(capsys):
    assert docs.main(["--check"]) == 0, capsys.readouterr().err
    assert "kdflow.workflow.docs" in (REPO / "Makefile").read_text().split("\ndocs:", 1)[1]


# ---------------------------------------------------------------------------
# The config reference
# ---------------------------------------------------------------------------

def schema_keys():
    """(dotted key, schema node) of every key of the schema, walked here on
    its own (not with docs.keys), `$ref`s followed."""
    root = _schema.load()

    def walk(node, path):
        if "$ref" in node:
            node = {**root["$defs"][node["$ref"].rsplit("/", 1)[-1]], **node}
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}".lstrip(".")
            if "$ref" in sub:
                sub = {**root["$defs"][sub["$ref"].rsplit("/", 1)[-1]], **sub}
            yield where, sub
            yield from walk(sub, where)

    return list(walk(root, ""))


def reference_rows() -> dict[str, list[str]]:
    page = (REPO / docs.CONFIG_PAGE).read_text()
    block = page.split(docs.CONFIG_BEGIN)[1].split(docs.CONFIG_END)[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"^\| `([\w.]+)` \| (.*) \|$", line)
        if m:
            rows[m[1]] = [c.strip() for c in re.split(r"(?<!\\)\|", m[2])]
    return block, rows


def test_the_config_reference_names_every_schema_key_with_its_default():
    block, rows = reference_rows()
    headings = re.findall(r"^### `(\w+)`$", block, re.M)
    root = _schema.load()
    assert headings == list(root["properties"]), "every top-level key has its section, in order"
    for key, node in schema_keys():
        if key.startswith("student.") and node["description"].startswith("Teacher only."):
            assert key not in rows  # refused for a student: left out
            continue
        if node.get("properties") and "." not in key:
            # A top-level section: its heading, then "Default: `...`".
            section = block.split(f"### `{key}`", 1)[1].split("\n### ", 1)[0]
            shown = re.search(r"^Default: `(.*?)`", section, re.M)
            assert shown and yaml.safe_load(shown[1]) == node["default"], key
            continue
        assert key in rows, f"{key} is missing from {docs.CONFIG_PAGE}: run `make docs`"
        default = rows[key][0]
        if "default" in node:
            assert default.startswith("`") and yaml.safe_load(default.strip("`")) == node["default"], (
                f"{key}: the reference says {default}, the schema {node['default']!r}")
        assert rows[key][2], f"{key}: no entry for what a change reruns"


def test_the_reruns_table_names_only_schema_keys_and_covers_every_section():
    page = (REPO / docs.CONFIG_PAGE).read_text()
    table = docs.reruns_table(page)
    known = {key for key, _ in schema_keys()}
    for named, change, _ in table:
        for key in named:
            # `folder` is a value (data.dataset), not a key.
            assert key in known or key == "folder", (
                f"the reruns row {change!r} names {key!r}, which is no key of the schema")
    for top in _schema.load()["properties"]:
        assert docs.reruns_of(top, table) or all(
            docs.reruns_of(k, table) for k, _ in schema_keys() if k.startswith(top + ".")), top


def test_a_key_takes_the_rerun_of_its_row_or_its_nearest_section():
    table = [(["kd"], "`kd`: a value changed", "A"), (["kd"], "`kd`: a value added", "B"),
             (["kd.dkd"], "`kd.dkd`", "C"), (["report"], "`report` †", "D")]
    assert docs.reruns_of("kd.dkd.beta", table) == "C"
    assert docs.reruns_of("kd.temperature", table) == "a value changed: A; a value added: B"
    assert docs.reruns_of("report.title", table) == "D †"
    assert docs.reruns_of("seeds", table) == ""


# ---------------------------------------------------------------------------
# The results tree
# ---------------------------------------------------------------------------

MD5 = "0" * 32
# The dry runs whose outputs the tree must cover: the default experiment; a
# shared, fine-tuned teacher with a subset, two settings and confirmation
# seeds; an imported teacher.
TREE_CONFIGS = {
    "default": {},
    "shared": {"teacher": {"shared": True, "init": {"url": "/nowhere/init.pt", "md5": MD5}},
               "data": {"subset": {"train": 2000, "test": 1000}, "val_size": 200},
               "confirm_seeds": [5, 6], "kd": {"temperature": [2, 4]}},
    "imported": {"teacher": {"checkpoint": {"url": "/nowhere/teacher.pt", "md5": MD5}}},
}
# Files a job leaves only while it runs (kdflow.train.resume), not outputs.
NOT_OUTPUTS = {"seed0/teacher/resume.pt"}


def planned_paths(workdir: Path, config: dict) -> set[str]:
    """Output, log and benchmark paths (under results/) of a dry run."""
    proc = snakemake(workdir, config, "-n", name="tree.yaml")
    paths = set()
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^\s+(?:output|log|benchmark): (.*)$", line)
        if m:
            paths |= {p.strip() for p in m[1].split(", ")}
    assert paths, proc.stdout + proc.stderr
    return {p.removeprefix("results/") for p in paths}


def tree_entries() -> set[str]:
    """The tree's paths (under results/): one per name; a line's first
    entry carries the directory, the names after it share that directory."""
    page = (REPO / "docs" / "results.md").read_text()
    block = page.split("<!-- results tree:", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    entries = set()
    for line in block.splitlines()[1:]:
        # An entry starts two spaces in; deeper lines continue a description.
        m = re.match(r"  ([\w.*/-]+(?:, [\w.*/-]+)*)", line)
        if not m:
            continue
        shown = m[1]
        first, *more = shown.split(", ")
        where = first.rsplit("/", 1)[0] + "/" if "/" in first.rstrip("/") else ""
        entries |= {first, *(where + name for name in more)}
    return entries


def covered(path: str, entries: set[str]) -> bool:
    path = re.sub(r"^((?:logs/|benchmarks/)?)seed\d+/", r"\1seed0/", path)
    if path.split("/")[0] in ("logs", "benchmarks"):
        return path.split("/")[0] + "/" in entries
    if path.startswith("figures/"):
        return "figures/*.png" in entries and path.endswith(".png")
    parts = path.split("/")
    if parts[0] == "seed0" and parts[1] != "teacher":
        # A student's files: a student directory of the same depth (its plain
        # arm, or a method and setting) is listed with "...", and its files
        # are those a teacher's directory lists.
        depth = len(parts) - 1
        return any(e.endswith("/...") and len(e.split("/")) - 1 == depth
                   and (e.split("/")[2] == "ce") == (parts[2] == "ce") for e in entries) and (
            f"seed0/teacher/{parts[-1]}" in entries)
    return path in entries


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict[str, set[str]]:
    def one(name):
        return name, planned_paths(tmp_path_factory.mktemp(f"tree-{name}"), TREE_CONFIGS[name])

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, TREE_CONFIGS))


def test_the_results_tree_lists_every_file_the_rules_write(planned):
    entries = tree_entries()
    missing = sorted({p for paths in planned.values() for p in paths if not covered(p, entries)})
    assert not missing, f"docs/results.md's tree lacks {missing}"


def test_the_results_tree_lists_no_file_the_rules_do_not_write(planned):
    made = {re.sub(r"^seed\d+/", "seed0/", p) for paths in planned.values() for p in paths}
    dirs = {p.rsplit("/", 1)[0] + "/" for p in made}
    for entry in tree_entries() - NOT_OUTPUTS:
        if entry.endswith("/..."):
            assert entry[:-3] in dirs, f"{entry}: no such model directory is planned"
        elif entry.endswith("/") or entry == "figures/*.png":
            assert any(p.startswith(entry.split("*")[0]) for p in made), entry
        else:
            assert entry in made, f"docs/results.md lists {entry}, which no rule writes"


# ---------------------------------------------------------------------------
# Every command of the docs runs
# ---------------------------------------------------------------------------

# Commands that cannot be dry-run, by their first words, and why. Each is
# still checked: a make target must exist (`make -n`), a script and the
# options given to it must exist.
EXCEPTIONS = {
    "make test": "runs the test suite itself (about 25 minutes)",
    "make lint": "runs snakemake --lint and snakefmt: a check of its own, not a run",
    "make docs": "rewrites the generated blocks; test_make_docs_finds_every_generated_block_up_to_date checks them",
    ".venv/bin/python bench/": "a benchmark: minutes of measuring (gpu_check.py needs a GPU)",
    "md5sum": "reads a file of yours",
    "srun": "needs a SLURM cluster",
}
# Stand-ins for what a command's reader supplies: any md5, and an image
# folder where the docs name one (a directory is read when the workflow is
# parsed; an archive or a weights file only by its job).
PLACEHOLDERS = {"<its md5>": MD5}
FOLDERS = ("/data/my_photos",)


def uncommented(line: str) -> str:
    """`line` without its shell comment (a # after a blank, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) of every line of every ```bash block, continuation
    lines joined, comments dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = uncommented(line)
                if line and not line.startswith("#"):
                    found.append((page.relative_to(REPO).as_posix(), " ".join(line.split())))
    return found


def image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / cls / "0.png")
    return root


def planned_by(command: str, workdir: Path) -> tuple[list[str], str | None]:
    """The `snakemake -n` run that a documented command stands for, and the
    make target it also needs (or None)."""
    words = shlex.split(command)
    if words[0] == "time":
        words = words[1:]
    if words[:2] == ["make", "run"] or words[:2] == ["make", "report-zip"]:
        assigned = dict(w.split("=", 1) for w in words[2:])
        assert set(assigned) <= {"ARGS", "CORES"}, command
        args = shlex.split(assigned.get("ARGS", ""))
        # The command line `make run` starts (Makefile), dry.
        return ([SNAKEMAKE, "--cores", assigned.get("CORES", "4"), "--resources", "gpu=1", *args],
                words[1] if words[1] != "run" else None)
    if words[0] == ".venv/bin/snakemake":
        return [SNAKEMAKE, *words[1:]], None
    raise AssertionError(f"no way to dry-run {command!r}: add a case, or an EXCEPTIONS entry "
                         "saying why it cannot be")


def check_exception(command: str) -> None:
    words = shlex.split(command)
    if words[0] == "make":
        proc = subprocess.run(["make", "-n", "-C", str(REPO), *words[1:]],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
    elif words[0] == ".venv/bin/python":
        script = REPO / words[1]
        assert script.is_file(), command
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{option}"' in script.read_text(), f"{command}: {script} has no {option}"


def dry_run(command: str, workdir: Path) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    for folder in FOLDERS:
        if folder in command:
            command = command.replace(folder, str(image_folder(workdir / "images")))
    cmd, target = planned_by(command, workdir)
    if "--sdm" in cmd and cmd[cmd.index("--sdm") + 1] == "conda" and not shutil.which("conda"):
        # The page says it needs conda; without it, the rest of the command.
        del cmd[cmd.index("--sdm"):cmd.index("--sdm") + 2]
    run = workdir / "run"
    run.mkdir()
    cmd = [cmd[0], "-s", str(REPO / "Snakefile"), "--directory", str(run), "-n", "--quiet",
           "rules", *cmd[1:]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=local_env())
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return f"{command}\n  -> {shlex.join(cmd)}\n{out[-3000:]}"
    if target:
        made = subprocess.run(["make", "-n", "-C", str(REPO), *shlex.split(command)[1:]],
                              capture_output=True, text=True, timeout=60)
        args = dict(w.split("=", 1) for w in shlex.split(command)[2:]).get("ARGS", "")
        if made.returncode != 0 or args not in made.stdout:
            return f"{command}: make -n says\n{made.stdout}{made.stderr}"
    return ""


def test_every_command_in_the_readme_and_the_docs_runs(tmp_path):
    commands = documented_commands()
    # The quick preset comes first in the README.
    assert commands[0] == ("README.md", 'make run ARGS="--configfile config/presets/quick.yaml"')
    todo, seen = [], set()
    for page, command in commands:
        if command in seen:
            continue
        seen.add(command)
        excepted = [why for start, why in EXCEPTIONS.items() if command.startswith(start)]
        if excepted:
            check_exception(command)
        else:
            todo.append(command)
    assert todo
    dirs = [tmp_path / f"c{i}" for i in range(len(todo))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(dry_run, todo, dirs) if f]
    assert not failures, "\n\n".join(failures)


def test_the_config_snippets_of_the_docs_are_valid_configs():
    for page in PAGES:
        for block in re.findall(r"^```yaml\n(.*?)^```", page.read_text(), re.M | re.S):
            validate(yaml.safe_load(block))


def test_no_page_sets_a_nested_key_with_a_dotted_name():
    # Snakemake refuses `--config kd.temperature=4`; a page may say so in
    # words, but no command may do it.
    for page, command in documented_commands():
        assert not re.search(r"--config[^|]*\s[a-z_]+\.[a-z_.]+=", command), (page, command)


def test_every_link_between_pages_resolves():
    def anchors(path: Path) -> set[str]:
        heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).replace(" ", "-")
                for h in heads}

    for page in [*PAGES, REPO / "RELIABILITY.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(path), f"{page.name}: no heading for #{anchor} in {file}"


def test_what_config_readme_says_of_the_command_line_holds(tmp_path):
    """A dotted key is refused by Snakemake; a section's mapping merges into
    the config files' section (soft_target_weight and the quick preset's
    shared teacher stay)."""
    def dry(*args):
        return subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory",
                               str(tmp_path), "-n", "--cores", "1", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=local_env())

    refused = dry("--config", "kd.temperature=4")
    assert refused.returncode != 0
    assert "Config entry must start with a valid identifier" in refused.stdout + refused.stderr
    merged = dry("--configfile", "config/presets/quick.yaml",
                 "--config", "kd={temperature: 4}", "teacher={epochs: 2}")
    out = merged.stdout + merged.stderr
    assert merged.returncode == 0, out
    assert "results/seed0/lightnn/kd/T4_w0.25/model.pt" in out      # w kept: 0.25
    assert "results/teacher/model.pt" in out and "seed0/teacher/model.pt" not in out  # shared
    assert "results/data/cifar10-subset.npz" in out                 # the preset's subset

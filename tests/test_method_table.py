"""The method table (kdflow.distill.methods): checked against the schema and
the README, and a toy method added as one table entry and run through the
workflow. (The newer methods' losses by hand: tests/test_losses.py.)"""

import json
import re
import shutil

import pytest
import yaml

from kdflow.distill import methods
from kdflow.core import schema
from tests.helpers.workflow import REPO, base_config, deep_update, planned_jobs, snakemake


# ---------------------------------------------------------------------------
# One table, and what must agree with it
# ---------------------------------------------------------------------------

def test_schema_lists_the_methods_of_the_table_in_its_order():
    assert schema.load()["$defs"]["method"]["enum"] == list(methods.METHODS)


def test_every_knob_is_a_schema_key_with_a_default():
    for spec in methods.METHODS.values():
        assert spec.name in methods.METHODS and spec.knobs, spec.name
        tags = [k.tag for k in spec.knobs]
        assert len(set(tags)) == len(tags), f"{spec.name}: two knobs share a tag"
        for knob in spec.knobs:
            node = schema.node(f"kd.{knob.key}")
            assert "default" in node and "description" in node, knob.key
            # Every knob can be swept: a value or a list of values.
            assert "array" in node["type"], knob.key


def test_readme_method_table_matches_the_table():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- methods:", 1)[1].split("\n\n", 1)[0]
    rows = [r for r in block.splitlines() if r.startswith("| `")]
    assert [re.match(r"\| `(\w+)`", r)[1] for r in rows] == list(methods.METHODS)
    for row, spec in zip(rows, methods.METHODS.values()):
        knobs = row.rsplit("|", 2)[-2]
        assert [k.key for k in spec.knobs] == re.findall(r"`([\w.]+)`", knobs), spec.name


def test_a_method_missing_from_the_schema_is_refused_clearly():
    from kdflow import KdflowError
    from kdflow.workflow.config import validate

    s = schema.load()
    s["$defs"]["method"]["enum"] = ["kd", "dkd"]
    with pytest.raises(KdflowError, match="differ; list each method in both"):
        validate({}, s)


# ---------------------------------------------------------------------------
# A method is one table entry: a toy one, added to a copy of the project
# ---------------------------------------------------------------------------

TOY_ENTRY = '''

def _toy(values, ctx):
    import torch.nn.functional as F

    scale = values["toy.scale"]
    return Method(lambda s: F.cross_entropy(s.logits, s.targets) + scale * F.mse_loss(
        s.logits.softmax(1), s.teacher_logits.softmax(1)), features=False)


METHODS["toy"] = MethodSpec("toy", "toy (test only)", (Knob("toy.scale", "s", True),),
                            logits_only=True, build=_toy, reference="kdflow's tests")
'''


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    """A copy of the project whose method table (and schema) has one more entry."""
    repo = tmp_path_factory.mktemp("toy") / "kdflow"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "results", ".snakemake", "__pycache__", ".pytest_cache", "tests"))
    with open(repo / "kdflow/distill/methods.py", "a") as f:
        f.write(TOY_ENTRY)
    s = yaml.safe_load((repo / "config/schema.yaml").read_text())
    s["$defs"]["method"]["enum"].append("toy")
    s["properties"]["kd"]["properties"]["toy"] = {
        "description": "The toy method's knob.", "type": "object", "default": {},
        "additionalProperties": False,
        "properties": {"scale": {"description": "Weight of the toy term.",
                                 "type": ["number", "array"], "items": {"type": "number"},
                                 "default": 1.0}}}
    (repo / "config/schema.yaml").write_text(yaml.safe_dump(s, sort_keys=False))
    return repo


def test_a_toy_method_in_one_table_entry_dry_runs_and_runs(toy_repo, tmp_path, tiny_archive):
    config = deep_update(base_config(*tiny_archive), {
        "seeds": [0], "kd": {"method": ["kd", "toy"], "toy": {"scale": [0.5, 2.0]}}})
    jobs = planned_jobs(tmp_path, config, repo=toy_repo)
    # One kd and two toy students; logit-only, so the teacher's logits are shared.
    assert jobs["train_student_kd"] == 3 and jobs["teacher_logits"] == 1
    snakemake(tmp_path, config, repo=toy_repo)
    res = tmp_path / "results"
    for scale, name in ((0.5, "s0.5"), (2.0, "s2")):
        arm = f"lightnn/toy/{name}"
        m = json.loads((res / f"seed0/{arm}/metrics.json").read_text())
        assert m["plan"]["values"] == {"toy.scale": scale} and m["plan"]["method"] == "toy"
    study = __import__("pandas").read_csv(res / "summary/study.csv")
    toy = study[study["method"] == "toy"]
    assert toy["toy.scale"].tolist() == [0.5, 2.0]
    assert "toy (test only) s=0.5" in (res / "report.html").read_text()

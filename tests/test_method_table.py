"""The method table: checked against the schema and the README, the two
newer methods (logit standardization, DIST) against hand-computed values,
and a toy method added as one table entry and run through the workflow."""

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdflow.distill import methods
from kdflow.core import schema
from kdflow.distill.losses import dist_loss, dist_total_loss, kd_loss, standardize_logits, dkd_total_loss
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
# Logit standardization (Sun et al. 2024), by hand
# ---------------------------------------------------------------------------

def test_standardized_logits_by_hand():
    z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]))
    # mean 2, unbiased sd 1; mean 1, unbiased sd sqrt(3)
    r3 = math.sqrt(3)
    want = torch.tensor([[-1.0, 0.0, 1.0], [-1 / r3, -1 / r3, 2 / r3]])
    assert torch.allclose(z, want, atol=1e-6)


def test_logit_standardization_ignores_the_teachers_scale():
    """Teacher logits 2x the student's: plain KD still pushes the student to
    sharpen, KD with standardization sees identical shapes (soft term 0)."""
    s, t, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([0])
    ce = F.cross_entropy(s, y).item()
    assert kd_loss(s, t, y, 2.0, 0.25, standardize=True).item() == pytest.approx(0.75 * ce,
                                                                                  abs=1e-6)
    assert kd_loss(s, t, y, 2.0, 0.25, standardize=False).item() > 0.75 * ce + 1e-3


def test_kd_with_standardization_by_hand():
    # z_s = [-1, -1, 2] / sqrt(3), z_t = [-1, 0, 1]; KL(softmax(z_t) || softmax(z_s))
    # = 0.0503709 at T = 1 (worked by hand: p_t = [.0900, .2447, .6652],
    # q_s = [.1307, .1307, .7387]).
    s, t, y = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])
    ce = F.cross_entropy(s, y).item()
    got = kd_loss(s, t, y, 1.0, 0.5, standardize=True).item()
    assert got == pytest.approx(0.5 * ce + 0.5 * 0.0503709, abs=1e-6)


def test_dkd_with_standardization_uses_the_z_scores():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g) * 4, torch.randn(8, 10, generator=g) * 9
    y = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(s, y)
    on = dkd_total_loss(s, t, y, 2.0, 1.0, 8.0, 1.0, standardize=True)
    by_hand = dkd_total_loss(standardize_logits(s), standardize_logits(t), y, 2.0, 1.0, 8.0,
                             1.0) - F.cross_entropy(standardize_logits(s), y) + ce
    assert on.item() == pytest.approx(by_hand.item(), rel=1e-5)


# ---------------------------------------------------------------------------
# DIST (Huang et al. 2022), by hand
# ---------------------------------------------------------------------------

LN2 = math.log(2)
# softmax rows: student [1/4, 1/4, 1/2], [1/2, 1/4, 1/4];
#               teacher [1/5, 2/5, 2/5], [2/5, 2/5, 1/5]
DIST_S = torch.tensor([[0.0, 0.0, LN2], [LN2, 0.0, 0.0]])
DIST_T = torch.tensor([[0.0, LN2, LN2], [LN2, LN2, 0.0]])


def test_dist_by_hand():
    """Rows: centred [-1/12, -1/12, 1/6] . [-2/15, 1/15, 1/15] = 1/60 over
    norms 1/30, so each sample's correlation is 1/2: inter = 1/2. Columns:
    class 0 and 2 correlate perfectly (1), class 1 is constant (0 by the
    eps convention): intra = 1 - 2/3 = 1/3."""
    assert dist_loss(DIST_S, DIST_T, 1.0, 1.0, 0.0).item() == pytest.approx(0.5, rel=1e-5)
    assert dist_loss(DIST_S, DIST_T, 1.0, 0.0, 1.0).item() == pytest.approx(1 / 3, rel=1e-5)
    assert dist_loss(DIST_S, DIST_T, 1.0, 2.0, 3.0).item() == pytest.approx(2.0, rel=1e-5)
    # T^2 scaling: the same probabilities at T = 2 from doubled logits.
    assert dist_loss(2 * DIST_S, 2 * DIST_T, 2.0, 1.0, 1.0).item() == pytest.approx(
        4 * (0.5 + 1 / 3), rel=1e-5)
    y = torch.tensor([2, 0])
    assert dist_total_loss(DIST_S, DIST_T, y, 1.0, 1.0, 1.0).item() == pytest.approx(
        F.cross_entropy(DIST_S, y).item() + 0.5 + 1 / 3, rel=1e-5)


def test_dist_is_zero_for_a_shifted_and_scaled_copy_and_has_gradients():
    """Pearson correlation is invariant to shift and scale of the
    probabilities: a student matching the teacher's relations exactly has
    no DIST loss even where its probabilities differ (here p_s = p_t / 2 +
    1/6 per row, so each row still sums to 1, and per column too)."""
    p_t = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.25, 0.5, 0.25]])
    p_s = 0.5 * p_t + 0.5 / 3
    assert not torch.allclose(p_s, p_t)
    assert dist_loss(p_s.log(), p_t.log(), 1.0, 1.0, 1.0).item() == pytest.approx(0, abs=1e-6)
    # ...while KL, which asks for the very probabilities, is not zero.
    assert kd_loss(p_s.log(), p_t.log(), torch.tensor([0, 1, 2]), 1.0, 1.0).item() > 1e-3
    s = torch.randn(4, 10, requires_grad=True)
    dist_total_loss(s, torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), 4.0, 1.0, 1.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


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

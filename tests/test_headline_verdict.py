"""The headline's verdict and the choice it rests on, on constructed tables
with exact numbers: equal gains, ties on validation, and the family a
headline setting was chosen from (kdflow.analysis.aggregate, kdflow.study.planner).

The tables here have the columns kdflow.analysis.aggregate.collect gives them; the
workflow runs of tests/test_two_stage.py check the same end to end."""

import json

import pandas as pd
import pytest

from kdflow.analysis import aggregate
from kdflow.models import checkpoint
from kdflow.study import planner

VAL, TEST = 200, 10_000


def model_rows(arm, role, student, seeds, correct, val_correct, method=None, setting=None):
    return [{"seed": s, "arm": arm, "stage": "selection", "role": role, "student": student,
             "method": method, "setting": setting, "label": arm, "flag": "",
             "correct": c, "test_images": TEST, "accuracy": c / TEST,
             "best_val_correct": v, "val_images": VAL, "best_val_accuracy": v / VAL,
             "teacher_agreement": 0.9}
            for s, c, v in zip(seeds, correct, val_correct)]


def table(rows, order):
    df = pd.DataFrame(rows)
    df["arm"] = pd.Categorical(df["arm"], order, ordered=True)
    return df.sort_values(["arm", "seed"], kind="stable").reset_index(drop=True)


def test_the_choose_step_and_the_aggregate_choose_alike_on_an_exact_tie(tmp_path):
    # Two settings whose validation means are exactly equal (311/600), seeds
    # listed [2, 0, 1] as a user may write them. Summed as floats in config
    # order (the choose step) A is below B in the last bit; averaged over
    # sorted seeds (the aggregate) A is above B: the two steps used to pick
    # different settings and the aggregate refused every rerun.
    seeds = [2, 0, 1]
    val = {"lightnn/kd/A": {0: 130, 1: 84, 2: 97}, "lightnn/kd/B": {0: 97, 1: 130, 2: 84}}
    in_order = {a: [v[s] / VAL for s in seeds] for a, v in val.items()}
    by_seed = {a: pd.Series([v[s] / VAL for s in sorted(seeds)]).mean() for a, v in val.items()}
    assert sum(in_order["lightnn/kd/A"]) / 3 < sum(in_order["lightnn/kd/B"]) / 3
    assert by_seed["lightnn/kd/A"] > by_seed["lightnn/kd/B"]  # the float trap is real

    order = ["teacher", "lightnn/ce", "lightnn/kd/A", "lightnn/kd/B"]
    paths, runs = [], []
    for s in seeds:
        for arm in ("lightnn/kd/A", "lightnn/kd/B"):
            p = tmp_path / f"seed{s}" / arm / "model.pt"
            p.parent.mkdir(parents=True)
            checkpoint.save(p, state_dict={}, model="lightnn", num_classes=10, image_size=32,
                            best_val_accuracy=val[arm][s] / VAL, best_val_correct=val[arm][s],
                            val_images=VAL, last_epoch=3)
            paths.append(str(p))
            runs.append({"seed": s, "arm": arm, "student": "lightnn", "order": order.index(arm)})
    record = planner.write_choice(paths, runs, str(tmp_path / "choice.json"))

    rows = model_rows("lightnn/ce", "student_baseline", "lightnn", seeds, [5000] * 3, [90] * 3)
    for arm in ("lightnn/kd/A", "lightnn/kd/B"):
        rows += model_rows(arm, "student_kd", "lightnn", seeds, [5010, 5020, 5030],
                           [val[arm][s] for s in seeds], "kd", arm[-1])
    t = aggregate.study_table(table(rows, order))
    chosen = t.loc[t["chosen_for_student"], "arm"].astype(str).tolist()
    assert chosen == [record["students"]["lightnn"]["arm"]]
    # The documented tie-break: the setting planned first.
    assert chosen == ["lightnn/kd/A"]
    assert json.loads((tmp_path / "choice.json").read_text())["students"]["lightnn"]["arm"] \
        == "lightnn/kd/A"


def test_choose_does_not_depend_on_the_order_candidates_come_in():
    cands = [{"arm": a, "student": "s", "order": i, "val_correct": {"0": 50, "1": 70},
              "val_images": {"0": 100, "1": 100}} for i, a in enumerate("xyz")]
    assert planner.choose(cands)["s"]["arm"] == "x"
    assert planner.choose(cands[::-1])["s"]["arm"] == "x"
    cands[2]["val_correct"] = {"0": 50, "1": 71}
    assert planner.choose(cands[::-1])["s"]["arm"] == "z"


def gain_view(base, gains):
    """A headline view: teacher, plain and distilled student per seed."""
    rows = []
    for s, (b, g) in enumerate(zip(base, gains)):
        for role, c in (("teacher", b + 500), ("student_baseline", b),
                        ("student_kd", b + g)):
            rows.append({"seed": s, "arm": role, "correct": c, "test_images": TEST,
                         "accuracy": c / TEST})
    df = pd.DataFrame(rows)
    df["arm"] = pd.Categorical(df["arm"], aggregate.ARM_ORDER, ordered=True)
    return df


ARMS = {"teacher": "teacher", "student_baseline": "lightnn/ce",
        "student_kd": "lightnn/kd/T4_w0.9"}


def test_equal_gains_give_no_fake_certainty():
    # +37 of 10,000 on every seed: as floats the gains have sd ~ 6e-17 and
    # the t-test said p = 1e-28, "beyond seed noise".
    gain = aggregate.kd_gain(gain_view([5013, 6120, 7342], [37, 37, 37]))
    assert gain["gain_images"].tolist() == [37, 37, 37]
    head = aggregate.headline(gain, ARMS, 1)
    test, v = head["paired_test"], head["verdict"]
    assert test["equal_gains"] and test["sd_gain"] == 0.0
    assert test["p_value"] is None and test["t"] is None and test["ci_low"] is None
    assert v["kind"] == "equal" and v["test"] == "sign-flip" and not v["significant"]
    assert v["p_value"] == test["perm_p_value"] == test["perm_min_p"] == 0.25
    # Six seeds that all gain the same: the sign-flip test can say so.
    head6 = aggregate.headline(aggregate.kd_gain(gain_view(range(5000, 5006), [37] * 6)),
                               ARMS, 1)
    assert head6["verdict"]["kind"] == "equal" and head6["verdict"]["significant"]
    assert head6["verdict"]["p_value"] == pytest.approx(2 / 64)


def test_the_headline_verdict_follows_the_family_it_was_chosen_from():
    # Six settings over two students, seeds 0-3. Alone, the best setting's
    # t-test gives p < 0.05; adjusted over the six it was picked from (Holm)
    # it does not, and the verdict says so instead of "beyond seed noise".
    seeds = [0, 1, 2, 3]
    order = ["teacher"]
    rows = []
    for student in ("lightnn", "tinynn"):
        order.append(f"{student}/ce")
        rows += model_rows(f"{student}/ce", "student_baseline", student, seeds,
                           [5000, 5100, 5200, 5300], [90] * 4)
        for i, gains in enumerate(([30, 12, 40, 22] if student == "lightnn" else [5, -2, 1, 0],
                                   [1, -3, 4, 0], [2, 0, -1, 3])):
            arm = f"{student}/kd/S{i}"
            order.append(arm)
            rows += model_rows(arm, "student_kd", student, seeds,
                               [b + g for b, g in zip([5000, 5100, 5200, 5300], gains)],
                               [99 if i == 0 and student == "lightnn" else 95] * 4, "kd", f"S{i}")
    t = aggregate.study_table(table(rows, order))
    assert len(t) == 6
    # One family over every setting of both students (a missing p counts).
    assert t["p_value_holm"].tolist() == pytest.approx(
        [p for p in aggregate.holm(t["p_value"].tolist())])
    chosen = t.loc[t["chosen"]].iloc[0]
    assert chosen["arm"] == "lightnn/kd/S0"
    raw = chosen["p_value"]
    assert raw < 0.05 < chosen["p_value_holm"]
    fam = {"size": 6, "p_value": float(chosen["p_value_holm"]),
           "perm_p_value": float(chosen["perm_p_value_holm"])}
    view = gain_view([5000, 5100, 5200, 5300], [30, 12, 40, 22])
    head = aggregate.headline(aggregate.kd_gain(view), ARMS, 6, family=fam)
    v = head["verdict"]
    assert head["optimistic"] and v["adjusted"] and v["family_size"] == 6
    assert v["p_value"] == pytest.approx(chosen["p_value_holm"])
    assert v["kind"] == "noise" and not v["significant"]
    # Without a family (one setting, or confirmation seeds) the raw p decides.
    alone = aggregate.headline(aggregate.kd_gain(view), ARMS, 1)["verdict"]
    assert not alone["adjusted"] and alone["p_value"] == pytest.approx(raw)
    assert alone["kind"] == "beyond" and alone["significant"]


def test_a_setting_chosen_among_untested_ones_is_not_tested():
    fam = {"size": 3, "p_value": None, "perm_p_value": None}
    view = gain_view([5000, 5100, 5200], [30, 34, 29])
    v = aggregate.headline(aggregate.kd_gain(view), ARMS, 3, family=fam)["verdict"]
    assert v["kind"] == "untested" and not v["significant"]

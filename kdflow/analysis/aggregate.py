"""All per-model results -> tidy tables (one row per observation) with pandas.

Accuracies stay fractions in every file; the report shows them in percent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from kdflow import KdflowError
from kdflow.core import atomic
from kdflow.models import checkpoint
from kdflow.study import planner
from kdflow.distill.methods import METHODS
from kdflow.analysis.roles import ARM_LABELS, ARM_ORDER, headline_view  # noqa: F401 (re-exported)
from kdflow.analysis.ship import EXPORT_COLUMNS, export_rows
from kdflow.analysis.stats import holm, mean_ci, paired_comparison, verdict

log = logging.getLogger(__name__)

# Columns that describe an arm, in every per-model table: these, then one
# column per knob (by its config key, e.g. temperature, dkd.beta) of the
# methods present, in the method table's order (kdflow.distill.methods).
ARM_COLUMNS = ["role", "student", "method", "setting", "label"]
KNOB_COLUMNS = list(dict.fromkeys(k.key for m in METHODS.values() for k in m.knobs))


def arm_columns(df: pd.DataFrame) -> list[str]:
    return ARM_COLUMNS + [c for c in KNOB_COLUMNS if c in df]


def describe_arm(plan: dict) -> dict:
    """The columns of one model, from its plan record (kdflow.study.planner.plan) as
    stored in its metrics.json: nothing is read from the path."""
    arm = planner.Arm.from_record(plan)
    return {"role": arm.role, "student": arm.model if arm.role != "teacher" else None,
            "method": arm.method, "setting": arm.setting, "label": planner.label(arm),
            **arm.values}


# Per-model inputs, parallel lists in this order of keys.
MODEL_FILES = ("metrics", "speed", "histories", "checkpoints", "train_benchmarks",
               "eval_benchmarks", "exports")
# Files a run may lack for every model: exports, with export.enabled false.
OPTIONAL_FILES = ("exports",)


def _benchmark(path: str) -> dict:
    """Wall time and peak memory of a job from Snakemake's benchmark file."""
    b = pd.read_csv(path, sep="\t")
    return {"wall_seconds": float(b["s"].iloc[0]),
            "max_rss_mb": float(b["max_rss"].iloc[0]) if "max_rss" in b else np.nan}


def _read_json(path) -> dict:
    return json.loads(Path(path).read_text())


SELECTION, CONFIRMATION = "selection", "confirmation"


def _models(files: dict[str, list[str]], teacher: Optional[dict]):
    """(paths by MODEL_FILES key, seed) per model row: the per-seed models,
    then a shared teacher's one set of files once for every seed they cover,
    its seed replaced by theirs (its history and training benchmark are
    None for an imported teacher)."""
    keys = [k for k in MODEL_FILES if k not in OPTIONAL_FILES or files.get(k)]
    lists = [files[k] for k in keys]
    if len({len(v) for v in lists}) != 1:
        raise KdflowError("aggregate needs the same number of files of each kind per model")
    rows = [(dict(zip(keys, paths)), None) for paths in zip(*lists)]
    if not teacher:
        return rows
    seeds = list(dict.fromkeys(_read_json(p)["seed"] for p in files["metrics"]))
    return [({k: teacher.get(k) for k in MODEL_FILES}, s) for s in seeds] + rows


def collect(files: dict[str, list[str]], confirm_seeds: tuple[int, ...] = (),
            teacher: Optional[dict] = None) -> dict[str, pd.DataFrame]:
    """Read every model's files into tidy tables.

    `files` maps each key of MODEL_FILES to a list; entry i of every list
    belongs to the same model (the workflow expands them over the same seeds
    x arms), which is checked. `teacher`, by the same keys, holds the files
    of a teacher shared by every seed (teacher.shared, or an imported one):
    its rows are repeated for each seed, so every per-seed table and
    comparison reads as before, while its training job and provenance are
    listed once. Every row has its stage: confirmation for a seed of
    `confirm_seeds`, else selection.
    """
    models, curves, per_class, confusion, calib, jobs, prov = [], [], [], [], [], [], []
    exports = []
    listed = set()
    for paths, seed in _models(files, teacher):
        m_path, s_path, h_path, c_path, tb_path, eb_path, x_path = (
            paths.get(k) for k in MODEL_FILES)
        named = [p for p in (m_path, s_path, h_path, c_path) if p]
        if len({Path(p).parent for p in named}) != 1:
            raise KdflowError(f"{', '.join(named)} belong to different models")
        m, speed, ckpt = _read_json(m_path), _read_json(s_path), checkpoint.load(c_path)
        seed = m["seed"] if seed is None else seed
        key = {"seed": seed, "arm": m["arm"],
               "stage": CONFIRMATION if seed in confirm_seeds else SELECTION}
        about = describe_arm(m["plan"])
        train_job = _benchmark(tb_path) if tb_path else {"wall_seconds": np.nan,
                                                           "max_rss_mb": np.nan}
        eval_job = _benchmark(eb_path)
        models.append({
            **key, **about, "model": m["model"],
            "accuracy": m["accuracy"], "correct": m["correct"], "test_images": m["test_images"],
            "loss": m["loss"],
            "ece": m["calibration"]["ece"],
            # Flagged: at chance level, or distilled from such a teacher.
            "flag": m.get("flag") or "",
            "teacher_agreement": m.get("teacher_agreement", np.nan),
            "teacher_kl": m.get("teacher_kl", np.nan),
            "best_epoch": m["best_epoch"], "best_val_accuracy": m["best_val_accuracy"],
            "best_val_correct": m["best_val_correct"], "val_images": m["val_images"],
            "last_val_accuracy": m["last_val_accuracy"],
            "parameters": m["parameters"], "parameter_bytes": m["parameter_bytes"],
            "macs_per_image": m["macs_per_image"],
            "checkpoint_bytes": os.path.getsize(c_path),
            "latency_ms_batch1": speed["latency_ms_batch1"],
            "throughput_images_per_s": speed["throughput_images_per_s"],
            "speed_device": speed["device_name"],
            "train_seconds": ckpt["train_seconds"],
            "wall_seconds": train_job["wall_seconds"], "max_rss_mb": train_job["max_rss_mb"],
            "source": str(m_path),
        })
        if h_path:
            h = pd.read_csv(h_path)
            curves.append(h.assign(**key, source=str(h_path)))
        per_class += [{**key, "class": c, "accuracy": a, "source": str(m_path)}
                      for c, a in m["per_class_accuracy"].items()]
        classes = m["classes"]
        confusion += [{**key, "true": classes[i], "predicted": classes[j], "count": n,
                       "source": str(m_path)}
                      for i, row in enumerate(m["confusion_matrix"]) for j, n in enumerate(row)]
        calib += [{**key, "bin": b, **row, "source": str(m_path)}
                  for b, row in enumerate(m["calibration"]["bins"])]
        if x_path:
            exports += export_rows(key, _read_json(x_path), os.path.getsize(c_path), x_path)
        if c_path in listed:    # a shared teacher: one set of jobs, one provenance
            continue
        listed.add(c_path)
        if tb_path:
            jobs.append({**key, "job": "train", **train_job, "source": str(tb_path)})
        jobs.append({**key, "job": "evaluate", **eval_job, "source": str(eb_path)})
        prov.append({**key, **ckpt["provenance"], "source": str(c_path)})

    # Arms keep the workflow's order (teacher, then per student its baseline
    # and its settings), the order of the input lists.
    order = list(dict.fromkeys(r["arm"] for r in models))

    def frame(rows):
        df = pd.DataFrame(rows)
        df["arm"] = pd.Categorical(df["arm"], order, ordered=True)
        first = ["seed", "arm", "stage"]
        df = df[first + [c for c in df.columns if c not in first]]
        return df.sort_values(["arm", "seed"], kind="stable").reset_index(drop=True)

    history = pd.concat(curves, ignore_index=True)
    return {"metrics": frame(models), "history": frame(history), "per_class": frame(per_class),
            "confusion": frame(confusion), "calibration": frame(calib), "jobs": frame(jobs),
            "provenance": frame(prov),
            "exports": frame(exports) if exports else pd.DataFrame(columns=EXPORT_COLUMNS)}


def summarize_arms(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample sd, n and 95% t-interval of each arm's results over the
    models of each stage: one per seed, but one in all for a teacher shared
    by every seed (its rows repeat one file, a single measurement: no sd,
    no interval)."""
    rows = []
    for (arm, stage), g in table.groupby(["arm", "stage"], observed=True, sort=False):
        seeds_shown = g
        g = g.drop_duplicates("source")
        mean, lo, hi = mean_ci(g["accuracy"])
        flagged = seeds_shown.loc[seeds_shown["flag"] != "", "seed"].tolist()
        rows.append({
            "arm": arm, "stage": stage, **{c: g[c].iloc[0] for c in arm_columns(g)},
            "flag": (f"{g.loc[g['flag'] != '', 'flag'].iloc[0]} (seed "
                     f"{', '.join(map(str, flagged))})") if flagged else "",
            "model": g["model"].iloc[0], "n": len(g), "seeds": seeds_shown["seed"].nunique(),
            "shared": len(g) == 1 and seeds_shown["seed"].nunique() > 1,
            "parameters": g["parameters"].iloc[0], "macs_per_image": g["macs_per_image"].iloc[0],
            "checkpoint_bytes": g["checkpoint_bytes"].iloc[0],
            "accuracy_mean": mean, "accuracy_sd": g["accuracy"].std(),
            "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "loss_mean": g["loss"].mean(), "ece_mean": g["ece"].mean(),
            "best_val_accuracy_mean": g["best_val_accuracy"].mean(),
            "best_val_accuracy_sd": g["best_val_accuracy"].std(),
            "teacher_agreement_mean": g["teacher_agreement"].mean(),
            "teacher_agreement_sd": g["teacher_agreement"].std(),
            "teacher_kl_mean": g["teacher_kl"].mean(),
            "latency_ms_batch1": g["latency_ms_batch1"].median(),
            "throughput_images_per_s": g["throughput_images_per_s"].median(),
            "wall_seconds_mean": g["wall_seconds"].mean(),
        })
    out = pd.DataFrame(rows)
    out["arm"] = pd.Categorical(out["arm"], table["arm"].cat.categories, ordered=True)
    return out.sort_values(["stage", "arm"], kind="stable").reset_index(drop=True)


def study_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every distilled setting against its own student's baseline, paired by
    seed over the selection seeds, and the selection on validation accuracy.

    p_value is each setting's raw paired t-test and perm_p_value its
    sign-flip test; p_value_holm and perm_p_value_holm adjust them (Holm)
    over every distilled setting of the study, the family the headline's
    setting is picked from (a setting without a p-value still counts in
    it). chosen_for_student marks each student's setting with the best mean
    validation accuracy (kdflow.study.planner.choose, the choose step's rule);
    chosen the one of those that leads (the headline's). best_of_method and
    method_rank do the same per (student, method). Test accuracy never
    enters any choice.
    """
    table = table[table["stage"] == SELECTION]
    rows, candidates = [], []
    for arm, g in table[table["role"] == "student_kd"].groupby("arm", observed=True):
        student = g["student"].iloc[0]
        base = table[(table["role"] == "student_baseline") & (table["student"] == student)]
        pair = g.merge(base[["seed", "correct"]], on="seed", suffixes=("", "_baseline"))
        test = paired_comparison(pair["correct"], pair["correct_baseline"],
                                 _test_images(pair))
        candidates.append({
            "arm": str(arm), "student": student,
            "order": table["arm"].cat.categories.get_loc(arm),
            "val_correct": dict(zip(g["seed"].astype(str), g["best_val_correct"])),
            "val_images": dict(zip(g["seed"].astype(str), g["val_images"]))})
        rows.append({
            "arm": arm, **{c: g[c].iloc[0] for c in arm_columns(g)}, "n": len(g),
            "val_accuracy_mean": g["best_val_accuracy"].mean(),
            "accuracy_mean": g["accuracy"].mean(), "accuracy_sd": g["accuracy"].std(),
            "baseline_accuracy_mean": pair["correct_baseline"].mean() / test.images,
            "gain_mean": test.mean_gain, "gain_ci_low": test.ci_low,
            "gain_ci_high": test.ci_high, "equal_gains": test.equal_gains,
            "p_value": test.p_value, "perm_p_value": test.perm_p_value, "n_pairs": test.n,
            "teacher_agreement_mean": g["teacher_agreement"].mean(),
            "flag": next((f for f in g["flag"] if f), ""),
        })
    if not rows:
        raise KdflowError("no distilled students among the results")
    out = pd.DataFrame(rows)
    for col in ("p_value", "perm_p_value"):
        adjusted = holm([None if pd.isna(p) else float(p) for p in out[col]])
        out[f"{col}_holm"] = [np.nan if p is None else p for p in adjusted]
    # Every choice below is planner.choose's exact rule: per student, and per
    # (student, method) for the ranking.
    by_arm = {c["arm"]: c for c in candidates}
    choice = planner.choose(candidates)
    out["chosen_for_student"] = out["arm"].astype(str).isin([c["arm"] for c in choice.values()])
    out["chosen"] = out["arm"].astype(str) == choice[planner.headline_student(choice)]["arm"]
    out["best_of_method"] = False
    best_of_method = []
    for _, g in out.groupby(["student", "method"], sort=False):
        pick = planner.choose([by_arm[str(a)] for a in g["arm"]])[g["student"].iloc[0]]
        out.loc[out["arm"].astype(str) == pick["arm"], "best_of_method"] = True
        best_of_method.append(pick)
    ranked = sorted(best_of_method, key=lambda c: (-planner.val_mean(c), c["order"]))
    rank = {c["arm"]: i + 1 for i, c in enumerate(ranked)}
    out["method_rank"] = out["arm"].astype(str).map(rank)
    out["method_rank"] = out["method_rank"].astype("Int64")
    return out


def chosen_arms(study_df: pd.DataFrame) -> dict[str, str]:
    """Arm path of each role of the headline comparison."""
    kd = study_df.loc[study_df["chosen"]].iloc[0]
    return {"teacher": "teacher", "student_baseline": f"{kd['student']}/ce",
            "student_kd": str(kd["arm"])}


def kd_gain(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed: accuracy of each role, the distillation gain and the share
    of the teacher-student gap it closes ((KD - CE) / (teacher - CE)).
    `table` is a headline_view."""
    wide = table.pivot(index="seed", columns="arm", values="accuracy")
    missing = [a for a in ARM_ORDER if a not in wide]
    if missing:
        raise KdflowError(f"no results for {missing}")
    right = table.pivot(index="seed", columns="arm", values="correct")
    out = pd.DataFrame({
        "seed": wide.index,
        "teacher": wide["teacher"].to_numpy(),
        "student_baseline": wide["student_baseline"].to_numpy(),
        "student_kd": wide["student_kd"].to_numpy(),
        # The exact numbers behind them: test images right, and of how many.
        **{f"{a}_correct": right[a].to_numpy().astype(int) for a in ARM_ORDER},
        "test_images": _test_images(table),
    })
    out["gain_images"] = out["student_kd_correct"] - out["student_baseline_correct"]
    out["gain"] = out["gain_images"] / out["test_images"]
    gap = out["teacher"] - out["student_baseline"]
    out["gap_closed"] = np.where(gap > 0, out["gain"] / gap.where(gap > 0), np.nan)
    return out


def headline(gain: pd.DataFrame, chosen: dict[str, str], n_settings: int, *,
             stage: str = SELECTION, selection_seeds: list[int] = (),
             flags: list[dict] = (), family: Optional[dict] = None) -> dict:
    """The experiment in a few numbers, all derived from kd_gain.csv (and,
    for the verdict's adjusted p-values, study.csv).

    With several settings and no confirmation stage the gain is measured on
    the seeds that chose the setting: `optimistic` says so, and the verdict
    reads `family`, the chosen setting's p-values adjusted over every
    setting it was chosen among (see verdict)."""
    n = len(gain)
    means = gain[["teacher", "student_baseline", "student_kd"]].mean()
    gap = means["teacher"] - means["student_baseline"]
    test = paired_comparison(gain["student_kd_correct"], gain["student_baseline_correct"],
                             _test_images(gain))
    return {
        "n_seeds": n,
        "seeds": [int(s) for s in gain["seed"]],
        "stage": stage,
        "selection_seeds": [int(s) for s in selection_seeds],
        "optimistic": n_settings > 1 and stage == SELECTION,
        # Headline models flagged at chance level (role, seed, flag).
        "flags": list(flags),
        "arms": chosen,
        "distilled_settings": n_settings,
        "selected_on": "mean validation accuracy over the selection seeds",
        "teacher_mean": float(means["teacher"]),
        "student_baseline_mean": float(means["student_baseline"]),
        "student_kd_mean": float(means["student_kd"]),
        "gain_mean": test.mean_gain,
        "gain_sd": test.sd_gain,
        "seeds_kd_better": int((gain["gain"] > 0).sum()),
        # On the means, so that one seed with a tiny gap cannot dominate.
        "gap_closed": test.mean_gain / gap if gap > 0 else None,
        "teacher_retained_baseline": float(means["student_baseline"] / means["teacher"]),
        "teacher_retained_kd": float(means["student_kd"] / means["teacher"]),
        "paired_test": test.as_dict(),
        "verdict": verdict(test, family),
    }


def _add_confirmation(study_df: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Each student's chosen setting against its plain twin on the
    confirmation seeds: confirm_* columns on the chosen_for_student rows."""
    conf = metrics[metrics["stage"] == CONFIRMATION]
    out = study_df.copy()
    for col in ("confirm_n", "confirm_gain_mean", "confirm_gain_ci_low", "confirm_gain_ci_high",
                "confirm_p_value", "confirm_perm_p_value"):
        out[col] = np.nan
    for i, r in out[out["chosen_for_student"]].iterrows():
        kd = conf[conf["arm"].astype(str) == str(r["arm"])]
        base = conf[conf["arm"].astype(str) == f"{r['student']}/ce"]
        pair = kd[["seed", "correct"]].merge(base[["seed", "correct"]], on="seed",
                                              suffixes=("", "_baseline"))
        if pair.empty:
            continue
        test = paired_comparison(pair["correct"], pair["correct_baseline"], _test_images(kd))
        out.loc[i, ["confirm_n", "confirm_gain_mean", "confirm_gain_ci_low", "confirm_gain_ci_high",
                    "confirm_p_value", "confirm_perm_p_value"]] = [
            test.n, test.mean_gain, test.ci_low, test.ci_high, test.p_value, test.perm_p_value]
    return out


def _write_csv(df: pd.DataFrame, path: str) -> None:
    atomic.write_with(path, lambda tmp: df.to_csv(tmp, index=False))


def teacher_record(teacher: Optional[dict], metrics: pd.DataFrame,
                   checkpoints: list[str]) -> dict:
    """How the headline's teacher came to be: one per seed, or one shared
    by every seed (trained here with one seed, or imported: its url and md5);
    and the weights its training started from (teacher.init), if any."""
    if not teacher:
        first = next((c for c in checkpoints if Path(c).parent.name == "teacher"), None)
        init = checkpoint.load(first).get("init") if first else None
        return {"shared": False, "source": None, "init": init}
    ckpt = checkpoint.load(teacher["checkpoints"])
    source = ckpt.get("source")
    return {"shared": True, "trained_seed": ckpt.get("seed"),
            # What the import could and could not check (kdflow.models.weights).
            "source": {"url": source["url"], "md5": source["md5"],
                       "checked": source.get("checked") or [],
                       "unchecked": source.get("unchecked") or []} if source else None,
            "init": ckpt.get("init"),
            "file": str(teacher["checkpoints"]),
            "seeds": int(metrics["seed"].nunique())}


def aggregate(files: dict[str, list[str]], out: dict[str, str], *,
              confirm_seeds: list[int] = (), choice: str | None = None,
              teacher: Optional[dict] = None) -> None:
    """Write every table of `collect` plus arms, study, gain (CSV) and
    headline (JSON) to the paths in `out`.

    With confirmation seeds the headline compares the chosen setting with
    its teacher and plain twin on those seeds only; `choice` is the choice
    file they were trained from, which must agree with the selection
    stage's validation numbers here."""
    tables = collect(files, tuple(confirm_seeds), teacher)
    tables["arms"] = summarize_arms(tables["metrics"])
    tables["study"] = study_table(tables["metrics"])
    chosen = chosen_arms(tables["study"])
    stage = SELECTION
    if confirm_seeds:
        recorded = json.loads(Path(choice).read_text()) if choice else None
        if recorded is None or sorted(recorded["students"][s]["arm"] for s in recorded["students"]) \
                != sorted(tables["study"].loc[tables["study"]["chosen_for_student"], "arm"]
                          .astype(str)):
            raise KdflowError(f"the choice in {choice} does not match the selection stage's "
                              "validation accuracies; delete it and rerun")
        stage = CONFIRMATION
    view = headline_view(tables["metrics"], chosen, stage)
    tables["gain"] = kd_gain(view)
    # Each seed's flags (a model at chance level, or its teacher) beside its gain.
    per_seed = view[view["flag"] != ""].groupby("seed")["flag"].agg(
        lambda f: "; ".join(dict.fromkeys(f)))
    tables["gain"]["flag"] = tables["gain"]["seed"].map(per_seed).fillna("")
    if stage == CONFIRMATION:
        tables["study"] = _add_confirmation(tables["study"], tables["metrics"])
    flags = [{"role": str(r["arm"]), "seed": int(r["seed"]), "flag": r["flag"]}
             for _, r in view.iterrows() if r["flag"]]
    for name, df in tables.items():
        _write_csv(df, out[name])
    selection_seeds = sorted(tables["metrics"].loc[tables["metrics"]["stage"] == SELECTION,
                                                   "seed"].unique())
    family = None
    if stage == SELECTION and len(tables["study"]) > 1:
        row = tables["study"].loc[tables["study"]["chosen"]].iloc[0]
        family = {"size": len(tables["study"]),
                  "p_value": _or_none(row["p_value_holm"]),
                  "perm_p_value": _or_none(row["perm_p_value_holm"])}
    head = headline(tables["gain"], chosen, len(tables["study"]), stage=stage,
                    selection_seeds=selection_seeds, flags=flags, family=family)
    head["teacher"] = teacher_record(teacher, tables["metrics"], files["checkpoints"])
    # Settings that will not do what their names suggest (planner.warnings),
    # from the plan records the models were trained with.
    plans = {}
    for p in files["metrics"]:
        record = _read_json(p)["plan"]
        plans.setdefault(record["path"], planner.Arm.from_record(record))
    head["warnings"] = planner.warnings(plans.values())
    atomic.write_json(out["headline"], head)
    log.info("%d models over %d seeds; %d distilled settings, chosen on validation: %s, "
             "gain %+.2f points (mean)", len(tables["metrics"]), head["n_seeds"],
             len(tables["study"]), chosen["student_kd"], 100 * head["gain_mean"])


def _test_images(df: pd.DataFrame) -> int:
    """The one test-set size of the models in `df` (all are scored on the
    same test images)."""
    sizes = set(df["test_images"])
    if len(sizes) != 1:
        raise KdflowError(f"models scored on different numbers of test images: {sorted(sizes)}")
    return int(sizes.pop())


def _or_none(x) -> Optional[float]:
    return None if x is None or pd.isna(x) else float(x)

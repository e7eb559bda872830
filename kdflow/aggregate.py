"""All per-model results -> tidy tables (one row per observation) with pandas.

Accuracies stay fractions in every file; the report shows them in percent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kdflow import KdflowError, checkpoint

log = logging.getLogger(__name__)

ARM_ORDER = ["teacher", "student_baseline", "student_kd"]
ARM_LABELS = {
    "teacher": "Teacher",
    "student_baseline": "Student (CE only)",
    "student_kd": "Student (KD)",
}


def _benchmark(path: str) -> dict:
    """Wall time and peak memory of a job from Snakemake's benchmark file."""
    b = pd.read_csv(path, sep="\t")
    return {"wall_seconds": float(b["s"].iloc[0]),
            "max_rss_mb": float(b["max_rss"].iloc[0]) if "max_rss" in b else np.nan}


def collect(metrics: list[str], histories: list[str], benchmarks: list[str],
            checkpoints: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One row per model, one per model and epoch, and each model's provenance.

    The lists are parallel: entry i of each belongs to the same model (the
    workflow expands them over the same seeds x arms).
    """
    if not (len(metrics) == len(histories) == len(benchmarks) == len(checkpoints)):
        raise KdflowError("aggregate needs one history, benchmark and checkpoint "
                          "per metrics file")
    rows, curves, prov = [], [], []
    for m_path, h_path, c_path in zip(metrics, histories, checkpoints):
        if not Path(m_path).parent == Path(h_path).parent == Path(c_path).parent:
            raise KdflowError(f"{m_path}, {h_path} and {c_path} belong to different models")
        m = json.loads(Path(m_path).read_text())
        ckpt = checkpoint.load(c_path)
        prov.append({"seed": m["seed"], "arm": m["arm"], **ckpt["provenance"],
                     "source": str(c_path)})
        rows.append({
            "seed": m["seed"], "arm": m["arm"], "model": m["model"],
            "accuracy": m["accuracy"], "loss": m["loss"],
            "teacher_agreement": m.get("teacher_agreement", np.nan),
            "teacher_kl": m.get("teacher_kl", np.nan),
            "best_epoch": m["best_epoch"], "best_val_accuracy": m["best_val_accuracy"],
            "last_val_accuracy": m["last_val_accuracy"],
            "parameters": m["parameters"], "parameter_bytes": m["parameter_bytes"],
            "checkpoint_bytes": os.path.getsize(c_path),
            "train_seconds": ckpt["train_seconds"], "source": str(m_path),
        })
        h = pd.read_csv(h_path)
        h.insert(0, "arm", m["arm"])
        h.insert(0, "seed", m["seed"])
        h["source"] = str(h_path)
        curves.append(h)
    table = pd.DataFrame(rows)
    bench = pd.DataFrame([_benchmark(b) for b in benchmarks])
    table = pd.concat([table, bench], axis=1)
    table["arm"] = pd.Categorical(table["arm"], ARM_ORDER, ordered=True)
    table = table.sort_values(["arm", "seed"]).reset_index(drop=True)
    return table, pd.concat(curves, ignore_index=True), pd.DataFrame(prov)


def summarize_arms(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample sd and n of each arm's results over seeds."""
    g = table.groupby("arm", observed=True)
    out = g.agg(
        model=("model", "first"),
        n=("seed", "nunique"),
        parameters=("parameters", "first"),
        checkpoint_bytes=("checkpoint_bytes", "first"),
        accuracy_mean=("accuracy", "mean"),
        accuracy_sd=("accuracy", "std"),
        loss_mean=("loss", "mean"),
        best_val_accuracy_mean=("best_val_accuracy", "mean"),
        teacher_agreement_mean=("teacher_agreement", "mean"),
        teacher_agreement_sd=("teacher_agreement", "std"),
        teacher_kl_mean=("teacher_kl", "mean"),
        wall_seconds_mean=("wall_seconds", "mean"),
    )
    return out.reset_index()


def kd_gain(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed: accuracy of each arm, the KD gain and the share of the
    teacher-student gap it closes ((KD - CE) / (teacher - CE))."""
    wide = table.pivot(index="seed", columns="arm", values="accuracy")
    missing = [a for a in ARM_ORDER if a not in wide]
    if missing:
        raise KdflowError(f"no results for {missing}")
    out = pd.DataFrame({
        "seed": wide.index,
        "teacher": wide["teacher"].to_numpy(),
        "student_baseline": wide["student_baseline"].to_numpy(),
        "student_kd": wide["student_kd"].to_numpy(),
    })
    out["gain"] = out["student_kd"] - out["student_baseline"]
    gap = out["teacher"] - out["student_baseline"]
    out["gap_closed"] = np.where(gap > 0, out["gain"] / gap.where(gap > 0), np.nan)
    return out


def headline(gain: pd.DataFrame) -> dict:
    """The experiment in a few numbers, all derived from kd_gain.csv."""
    n = len(gain)
    means = gain[["teacher", "student_baseline", "student_kd"]].mean()
    gap = means["teacher"] - means["student_baseline"]
    mean_gain = float(gain["gain"].mean())
    return {
        "n_seeds": n,
        "teacher_mean": float(means["teacher"]),
        "student_baseline_mean": float(means["student_baseline"]),
        "student_kd_mean": float(means["student_kd"]),
        "gain_mean": mean_gain,
        "gain_sd": float(gain["gain"].std()) if n > 1 else None,
        "seeds_kd_better": int((gain["gain"] > 0).sum()),
        # On the means, so that one seed with a tiny gap cannot dominate.
        "gap_closed": mean_gain / gap if gap > 0 else None,
        "teacher_retained_baseline": float(means["student_baseline"] / means["teacher"]),
        "teacher_retained_kd": float(means["student_kd"] / means["teacher"]),
    }


def _write_csv(df: pd.DataFrame, path: str) -> None:
    tmp = f"{path}.part"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def aggregate(metrics: list[str], histories: list[str], benchmarks: list[str],
              checkpoints: list[str], out: dict[str, str]) -> None:
    """Write out['metrics'], ['history'], ['arms'], ['gain'], ['provenance']
    (CSV) and out['headline'] (JSON)."""
    table, curves, prov = collect(metrics, histories, benchmarks, checkpoints)
    _write_csv(prov, out["provenance"])
    gain = kd_gain(table)
    _write_csv(table, out["metrics"])
    _write_csv(curves, out["history"])
    _write_csv(summarize_arms(table), out["arms"])
    _write_csv(gain, out["gain"])
    head = headline(gain)
    Path(out["headline"]).write_text(json.dumps(head, indent=2) + "\n")
    log.info("%d models over %d seeds; KD gain %+.2f points (mean)",
             len(table), head["n_seeds"], 100 * head["gain_mean"])

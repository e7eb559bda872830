"""What you would ship: the deployment variants of the headline's models, and the choice.

Three steps, each a file in results/summary/:

  exports.csv  one row per model and variant (PyTorch fp32, ONNX fp32,
               ONNX int8): test and validation scores, size, agreement,
               from each model's export.json (the aggregate writes it)
  latency.csv  the headline's models timed together in one job
               (kdflow.deploy.timing): per case the spread of its calls
  ship.csv     per role and variant: accuracy, latency, speed-up over the
  ship.json    teacher, which variant each student ships, and whether
               distillation changed what you would ship

THE RULE (SHIP_RULE), per student: of its variants whose mean validation
accuracy is at most LARGE_DROP below its own PyTorch fp32 model's, ship the
one fastest at batch 1 on one thread of this CPU (ties: the simpler, in
VARIANTS order). Validation accuracy and latency decide; the test set never
does. Then plain and distilled student are compared *as shipped*: each
seed's shipped plain file against its shipped distilled file, on their
counts of correct test images, with the headline's tests
(kdflow.analysis.stats.paired_comparison and verdict). Distillation
changes what you ship only when that comparison says the distilled one is
better beyond seed noise; otherwise you ship the plain student, which needs
no teacher to reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from kdflow import KdflowError
from kdflow.analysis.roles import ARM_ORDER, headline_view
from kdflow.analysis.stats import paired_comparison, verdict
from kdflow.deploy.quantize import LARGE_DROP

# The deployment variants of a model, in the order the report lists them
# (and the rule breaks ties: the simpler first).
VARIANTS = [("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
VARIANT_LABELS = {("pytorch", "fp32"): "PyTorch fp32", ("onnxruntime", "fp32"): "ONNX fp32",
                  ("onnxruntime", "int8"): "ONNX int8"}
EXPORT_COLUMNS = ["seed", "arm", "stage", "runtime", "precision", "accuracy", "correct",
                  "test_images", "val_accuracy", "val_correct", "val_images", "bytes",
                  "large_drop", "val_large_drop", "agreement", "opset", "cpu", "source"]
SHIP_RULE = ("per student, of the variants whose mean validation accuracy is at most "
             f"{100 * LARGE_DROP:g} point below its PyTorch fp32 model's, the fastest at batch 1 "
             "on one thread")
STUDENTS = ("student_baseline", "student_kd")


def export_rows(key: dict, e: dict, checkpoint_bytes: int, source: str) -> list[dict]:
    """One row per deployment variant of a model's export.json: its test
    and validation scores, file size and agreement (with PyTorch for ONNX
    fp32, with ONNX fp32 for int8) and its large-drop flags."""
    check, q, val = e["check"], e["int8"], e.get("validation")
    if val is None:
        raise KdflowError(f"{source} has no validation scores (an export of an older kdflow); "
                          "delete it and rerun the export")
    about = {
        ("pytorch", "fp32"): (check["pytorch"], val["pytorch"], checkpoint_bytes, False, False,
                              1.0),
        ("onnxruntime", "fp32"): (check["onnxruntime"], val["onnxruntime"],
                                  e["files"]["fp32"]["bytes"], False, False,
                                  check["agreement"]["fraction"]),
    }
    if q:
        about[("onnxruntime", "int8")] = (q["accuracy"], val["int8"], e["files"]["int8"]["bytes"],
                                          bool(q["large_drop"]), bool(q["validation_large_drop"]),
                                          q["agreement_with_fp32"]["fraction"])
    return [{**key, "runtime": runtime, "precision": precision,
             "accuracy": test["accuracy"], "correct": test["correct"],
             "test_images": test["images"], "val_accuracy": v["accuracy"],
             "val_correct": v["correct"], "val_images": v["images"], "bytes": size,
             "large_drop": drop, "val_large_drop": val_drop, "agreement": agree,
             "opset": e["onnx"]["opset"], "cpu": e["cpu"]["name"], "source": str(source)}
            for (runtime, precision), (test, v, size, drop, val_drop, agree) in about.items()]


def compared(exports: pd.DataFrame, head: dict) -> list[str]:
    """The export.json files of the models the headline compares (its
    teacher, plain and distilled student on its stage's seeds), each once:
    what the timing job times."""
    view = headline_view(exports, head["arms"], head["stage"])
    return list(dict.fromkeys(view["source"].astype(str)))


def _latencies(latency: pd.DataFrame) -> pd.DataFrame:
    """Per (model, runtime, precision): the latency columns of ship.csv."""
    big, most = int(latency["batch"].max()), int(latency["threads"].max())
    rows = []
    for (key, runtime, precision), g in latency.groupby(["key", "runtime", "precision"],
                                                        sort=False):
        cell = {(int(r.batch), int(r.threads)): r for r in g.itertuples()}
        one = cell[(1, 1)]
        rows.append({"source": key, "runtime": runtime, "precision": precision,
                     "latency_ms_batch1": one.median_ms, "latency_ms_batch1_min": one.min_ms,
                     "latency_ms_batch1_p10": one.p10_ms, "latency_ms_batch1_p90": one.p90_ms,
                     "latency_n": one.n,
                     "latency_ms_batch": cell[(big, 1)].median_ms,
                     "latency_ms_batch1_all_threads": cell[(1, most)].median_ms,
                     "latency_ms_batch_all_threads": cell[(big, most)].median_ms,
                     "batch": big, "threads": most})
    return pd.DataFrame(rows)


def ship_table(exports: pd.DataFrame, latency: pd.DataFrame, head: dict) -> pd.DataFrame:
    """Per role of the headline and deployment variant: means over its
    models (one per seed; a shared teacher is one model) of test and
    validation accuracy, size and agreement; latency (medians of the one
    timing job, with the batch-1 spread); speed-up over the teacher's ONNX
    fp32 model at the same batch and threads (ratios within that job); the
    frontier (no other variant both faster at batch 1 and more accurate on
    test); and, per student, which variant the rule ships."""
    view = headline_view(exports, head["arms"], head["stage"])
    if view.empty:
        return pd.DataFrame(columns=["role", "model", "runtime", "precision", "accuracy"])
    lat = _latencies(latency)
    missing = set(view["source"].astype(str)) - set(lat["source"])
    if missing:
        raise KdflowError(f"no timing for {sorted(missing)}: rerun the timing job")
    view = view.drop_duplicates(["arm", "source", "runtime", "precision"])
    view = view.merge(lat, on=["source", "runtime", "precision"], how="left")
    rows = []
    for (role, runtime, precision), g in view.groupby(["arm", "runtime", "precision"],
                                                     observed=True, sort=False):
        rows.append({
            "role": str(role), "model": head["arms"][str(role)], "runtime": runtime,
            "precision": precision, "n": g["source"].nunique(),
            "accuracy": g["accuracy"].mean(), "accuracy_sd": g["accuracy"].std(),
            "val_accuracy": g["val_accuracy"].mean(),
            "bytes": g["bytes"].mean(), "agreement": g["agreement"].mean(),
            "large_drop": bool(g["large_drop"].any()),
            "val_large_drop": bool(g["val_large_drop"].any()),
            **{c: g[c].mean() for c in ("latency_ms_batch1", "latency_ms_batch1_min",
                                        "latency_ms_batch1_p10", "latency_ms_batch1_p90",
                                        "latency_ms_batch", "latency_ms_batch1_all_threads",
                                        "latency_ms_batch_all_threads")},
            "latency_n": int(g["latency_n"].min()),
            "batch": int(g["batch"].iloc[0]), "threads": int(g["threads"].iloc[0]),
            "cpu": g["cpu"].iloc[0], "source": "; ".join(sorted(set(g["source"])))})
    out = pd.DataFrame(rows)
    order = {v: i for i, v in enumerate(VARIANTS)}
    out["_o"] = [(ARM_ORDER.index(r), order[(rt, p)])
                 for r, rt, p in zip(out["role"], out["runtime"], out["precision"])]
    out = out.sort_values("_o").drop(columns="_o").reset_index(drop=True)
    ref = out[(out["role"] == "teacher") & (out["runtime"] == "onnxruntime")
              & (out["precision"] == "fp32")]
    for col in ("latency_ms_batch1", "latency_ms_batch"):
        out[f"speedup_{col.removeprefix('latency_ms_')}"] = (
            float(ref[col].iloc[0]) / out[col] if len(ref) else np.nan)
    out["frontier"] = [
        not ((out["latency_ms_batch1"] <= r.latency_ms_batch1) & (out["accuracy"] >= r.accuracy)
             & ((out["latency_ms_batch1"] < r.latency_ms_batch1)
                | (out["accuracy"] > r.accuracy))).any()
        for r in out.itertuples()]
    return mark_shipped(out)


def mark_shipped(ship: pd.DataFrame) -> pd.DataFrame:
    """The rule (SHIP_RULE): `val_drop` (points of validation accuracy below
    the role's PyTorch fp32), `eligible` (within LARGE_DROP) and `shipped`
    (the eligible variant fastest at batch 1, one thread; ties in VARIANTS
    order) for each student role; the teacher ships nothing."""
    out = ship.copy()
    out["val_drop"], out["eligible"], out["shipped"] = np.nan, False, False
    order = {v: i for i, v in enumerate(VARIANTS)}
    for role in STUDENTS:
        rows = out[out["role"] == role]
        ref = rows[(rows["runtime"] == "pytorch") & (rows["precision"] == "fp32")]
        if rows.empty or ref.empty:
            continue
        drop = float(ref["val_accuracy"].iloc[0]) - rows["val_accuracy"]
        out.loc[rows.index, "val_drop"] = drop
        # A hair of float noise must not turn an equal accuracy into a drop.
        eligible = drop <= LARGE_DROP + 1e-12
        out.loc[rows.index, "eligible"] = eligible
        pick = min(rows[eligible].itertuples(),
                   key=lambda r: (r.latency_ms_batch1, order[(r.runtime, r.precision)]))
        out.loc[pick.Index, "shipped"] = True
    return out


def _family(head_verdict: dict) -> Optional[dict]:
    """How the shipped comparison's p-values are adjusted: as the headline's
    were chosen (on these seeds among several settings), but Bonferroni over
    the same family size, an upper bound on Holm that needs no other
    setting's shipped files."""
    if not head_verdict.get("adjusted"):
        return None
    return {"size": head_verdict["family_size"], "method": "Bonferroni"}


def _bonferroni(p, size: int):
    return None if p is None else min(1.0, p * size)


def ship_verdict(ship: pd.DataFrame, exports: pd.DataFrame, head: dict) -> Optional[dict]:
    """ship.json: the rule, each role's shipped variant (teacher: its ONNX
    fp32 model, the speed-up reference), the paired comparison of the two
    shipped students by seed and its verdict, and what to ship: the
    distilled student only when it is better beyond seed noise as shipped."""
    if ship.empty:
        return None
    view = headline_view(exports, head["arms"], head["stage"])
    teacher = ship[(ship["role"] == "teacher") & (ship["runtime"] == "onnxruntime")
                   & (ship["precision"] == "fp32")].iloc[0]
    picked = {role: ship[(ship["role"] == role) & ship["shipped"]].iloc[0] for role in STUDENTS}
    counts = {}
    for role, r in picked.items():
        rows = view[(view["arm"] == role) & (view["runtime"] == r["runtime"])
                    & (view["precision"] == r["precision"])]
        counts[role] = rows.set_index("seed")[["correct", "test_images"]]
    pair = counts["student_kd"].join(counts["student_baseline"], lsuffix="", rsuffix="_baseline",
                                     how="inner").sort_index()
    images = set(pair["test_images"]) | set(pair["test_images_baseline"])
    if len(images) != 1:
        raise KdflowError(f"shipped files scored on different numbers of test images: {images}")
    test = paired_comparison(pair["correct"], pair["correct_baseline"], images.pop())
    family = _family(head["verdict"])
    if family:
        family.update(p_value=_bonferroni(test.p_value, family["size"]),
                      perm_p_value=_bonferroni(test.perm_p_value, family["size"]))
    v = verdict(test, family)
    changed = v["kind"] == "beyond" or (v["kind"] == "equal" and v["significant"]
                                        and test.mean_gain > 0)

    def keeps(r):
        return {"runtime": r["runtime"], "precision": r["precision"],
                "variant": VARIANT_LABELS[(r["runtime"], r["precision"])],
                "accuracy": float(r["accuracy"]), "val_accuracy": float(r["val_accuracy"]),
                "retained": float(r["accuracy"] / teacher["accuracy"]),
                "latency_ms": float(r["latency_ms_batch1"]),
                "speedup": float(r["speedup_batch1"]), "bytes": float(r["bytes"])}

    return {"rule": SHIP_RULE, "threshold": LARGE_DROP,
            "ship": "student_kd" if changed else "student_baseline", "changed": changed,
            "verdict": v, "test": test.as_dict(), "seeds": [int(s) for s in pair.index],
            "optimistic": bool(head.get("optimistic")),
            "teacher": {"variant": "ONNX fp32", "accuracy": float(teacher["accuracy"]),
                        "latency_ms": float(teacher["latency_ms_batch1"])},
            "student_baseline": keeps(picked["student_baseline"]),
            "student_kd": keeps(picked["student_kd"]), "cpu": teacher["cpu"]}


def ship(exports_csv: str, latency_csv: str, headline_json: str, out_csv: str,
         out_json: str) -> None:
    """The ship step: ship.csv and ship.json from the aggregate's exports
    and headline and the timing job's latency."""
    import json

    from kdflow.core import atomic

    head = json.loads(Path(headline_json).read_text())
    exports = pd.read_csv(exports_csv)
    table = ship_table(exports, pd.read_csv(latency_csv), head)
    atomic.write_with(out_csv, lambda tmp: table.to_csv(tmp, index=False))
    atomic.write_json(out_json, ship_verdict(table, exports, head))


def time_compared(exports_csv: str, headline_json: str, out_summary: str, out_samples: str, *,
                  settings: dict, threads: int) -> None:
    """The timing job of the headline's models (compared), one process."""
    import json

    from kdflow.deploy.timing import time_exports

    head = json.loads(Path(headline_json).read_text())
    time_exports(compared(pd.read_csv(exports_csv), head), out_summary, out_samples,
                 settings=settings, threads=threads)

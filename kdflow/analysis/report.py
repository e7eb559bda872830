"""The HTML report: seaborn figures embedded in one Jinja2-rendered file.

Everything shown is read from the tables the aggregate step wrote, and the
report names those files, so each number can be traced back. Each figure is
also written as a PNG of its own (for `snakemake --report` and for papers).
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdflow import KdflowError  # noqa: E402
from kdflow.core import atomic  # noqa: E402
from kdflow.analysis.figures import shown  # noqa: E402
from kdflow.analysis.ship import VARIANT_LABELS  # noqa: E402
from kdflow.analysis.roles import ARM_LABELS, ARM_ORDER, headline_view  # noqa: E402
from kdflow.distill.methods import METHODS  # noqa: E402
from kdflow.study.planner import fmt  # noqa: E402
from kdflow.core.provenance import config_hash  # noqa: E402

log = logging.getLogger(__name__)

PALETTE = {ARM_LABELS["teacher"]: "#4c72b0", ARM_LABELS["student_baseline"]: "#8c8c8c",
           ARM_LABELS["student_kd"]: "#dd8452"}
LABEL_ORDER = [ARM_LABELS[a] for a in ARM_ORDER]


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x, digits: int = 2) -> str:
    """A fraction as a percentage, or an en dash when undefined (n = 1 sd)."""
    return "–" if _missing(x) else f"{100 * x:.{digits}f}"


def signed_pct(x, digits: int = 2) -> str:
    return "–" if _missing(x) else f"{100 * x:+.{digits}f}"


def num(x, fmt: str = "{:,.0f}") -> str:
    return "–" if _missing(x) else fmt.format(x)


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(label=pd.Categorical(df["arm"].map(ARM_LABELS), LABEL_ORDER, ordered=True))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _integer_epochs(axes) -> None:
    for ax in np.ravel(axes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def fig_accuracy(metrics: pd.DataFrame) -> bytes:
    """Test accuracy of each arm: one dot per model, mean ± sd beside it
    (a teacher shared by every seed is one model: one dot)."""
    metrics = metrics.drop_duplicates(["arm", "source"])
    df = _labelled(metrics).assign(acc=100 * metrics["accuracy"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.stripplot(data=df, x="label", y="acc", hue="label", order=LABEL_ORDER,
                  palette=PALETTE, size=7, jitter=0.08, ax=ax, legend=False)
    sns.pointplot(data=df, x="label", y="acc", order=LABEL_ORDER, errorbar="sd",
                  color="black", markers="_", markersize=18, linestyle="none",
                  capsize=0.15, ax=ax)
    ax.set(xlabel="", ylabel="test accuracy (%)",
           title="Test accuracy per seed (dots) and mean ± sd")
    return _png(fig)


def fig_paired(gain: pd.DataFrame) -> bytes:
    """Baseline and KD student of each seed, joined: the paired comparison."""
    long = gain.melt(id_vars="seed", value_vars=["student_baseline", "student_kd"],
                     var_name="arm", value_name="acc")
    long["acc"] *= 100
    long["label"] = long["arm"].map(ARM_LABELS)
    long["KD better"] = long["seed"].map(dict(zip(gain["seed"], gain["gain"] > 0)))
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    sns.lineplot(data=long, x="label", y="acc", units="seed", estimator=None,
                 hue="KD better", palette={True: "#dd8452", False: "#8c8c8c"},
                 marker="o", ax=ax)
    for _, r in gain.iterrows():
        ax.annotate(f"seed {int(r['seed'])}", (1.04, 100 * r["student_kd"]),
                    xycoords=("data", "data"), fontsize=8, va="center")
    ax.set(xlabel="", ylabel="test accuracy (%)", title="Same seed, with and without KD")
    ax.set_xlim(-0.3, 1.45)
    return _png(fig)


def fig_curves(history: pd.DataFrame) -> bytes:
    """Train and validation accuracy and loss per epoch, mean with ± sd band."""
    rows = []
    for split in ("train", "val"):
        for metric in ("accuracy", "loss"):
            part = history[["seed", "arm", "epoch", f"{split}_{metric}"]].rename(
                columns={f"{split}_{metric}": "value"})
            if metric == "accuracy":
                part = part.assign(value=100 * part["value"])
            rows.append(part.assign(split="train" if split == "train" else "validation",
                                    metric="accuracy (%)" if metric == "accuracy" else "loss"))
    long = _labelled(pd.concat(rows, ignore_index=True))
    g = sns.relplot(data=long, x="epoch", y="value", hue="label", col="split", row="metric",
                    kind="line", errorbar="sd", palette=PALETTE, hue_order=LABEL_ORDER,
                    height=2.8, aspect=1.5, marker="o", facet_kws={"sharey": "row"})
    g.set_titles("{row_name}, {col_name}")
    g.set_axis_labels("epoch", "")
    g.legend.set_title("")
    _integer_epochs(g.axes)
    return _png(g.figure)


def fig_agreement(history: pd.DataFrame) -> bytes:
    """How closely each student imitates its teacher on validation images."""
    df = _labelled(history.dropna(subset=["val_teacher_agreement"]))
    df = df.assign(agreement=100 * df["val_teacher_agreement"])
    students = [ARM_LABELS["student_baseline"], ARM_LABELS["student_kd"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    sns.lineplot(data=df, x="epoch", y="agreement", hue="label", hue_order=students,
                 errorbar="sd", palette=PALETTE, marker="o", ax=axes[0])
    axes[0].set(ylabel="top-1 agreement (%)", title="Agreement with the teacher")
    sns.lineplot(data=df, x="epoch", y="val_teacher_kl", hue="label", hue_order=students,
                 errorbar="sd", palette=PALETTE, marker="o", ax=axes[1], legend=False)
    axes[1].set(ylabel="KL(teacher ‖ student)", title="Divergence from the teacher")
    axes[0].legend(title="")
    _integer_epochs(axes)
    fig.tight_layout()
    return _png(fig)


def fig_per_class(per_class: pd.DataFrame) -> bytes:
    df = _labelled(per_class).assign(acc=100 * per_class["accuracy"])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.barplot(data=df, x="class", y="acc", hue="label", hue_order=LABEL_ORDER,
                palette=PALETTE, errorbar="sd", ax=ax)
    ax.set(xlabel="", ylabel="test accuracy (%)", title="Accuracy per class (mean ± sd over seeds)")
    ax.legend(title="", ncols=3, loc="lower center", bbox_to_anchor=(0.5, -0.32))
    return _png(fig)


def fig_confusion(confusion: pd.DataFrame) -> bytes:
    """Row-normalised confusion matrices, summed over seeds, one per arm."""
    classes = list(dict.fromkeys(confusion["true"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, arm in zip(axes, ARM_ORDER):
        m = (confusion[confusion["arm"] == arm]
             .pivot_table(index="true", columns="predicted", values="count", aggfunc="sum")
             .reindex(index=classes, columns=classes))
        share = 100 * m.div(m.sum(axis=1).replace(0, np.nan), axis=0)
        sns.heatmap(share, ax=ax, cmap="Blues", vmin=0, vmax=100, annot=True, fmt=".0f",
                    annot_kws={"fontsize": 7}, cbar=arm == "student_kd",
                    cbar_kws={"label": "% of the true class"})
        ax.set(title=ARM_LABELS[arm], xlabel="predicted", ylabel="true" if arm == "teacher" else "")
    fig.tight_layout()
    return _png(fig)


def fig_reliability(calibration: pd.DataFrame, arms: pd.DataFrame) -> bytes:
    """Reliability diagram: accuracy against confidence, bins pooled over seeds."""
    c = calibration.dropna(subset=["accuracy"]).copy()
    c["correct"] = c["accuracy"] * c["count"]
    c["conf_sum"] = c["confidence"] * c["count"]
    pooled = c.groupby(["arm", "bin"], observed=True)[["count", "correct", "conf_sum"]].sum()
    pooled = pooled[pooled["count"] > 0].reset_index()
    pooled["accuracy"] = 100 * pooled["correct"] / pooled["count"]
    pooled["confidence"] = 100 * pooled["conf_sum"] / pooled["count"]
    pooled = _labelled(pooled)
    ece = dict(zip(arms["arm"], arms["ece_mean"]))
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.plot([0, 100], [0, 100], ls="--", color="black", lw=1, label="perfect calibration")
    for arm in ARM_ORDER:
        d = pooled[pooled["arm"] == arm]
        ax.plot(d["confidence"], d["accuracy"], marker="o", color=PALETTE[ARM_LABELS[arm]],
                label=f"{ARM_LABELS[arm]} (ECE {100 * ece[arm]:.1f}%)")
    ax.set(xlabel="confidence (%)", ylabel="accuracy (%)", xlim=(0, 100), ylim=(0, 100),
           title="Reliability diagram (test set)")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def fig_efficiency(metrics: pd.DataFrame) -> bytes:
    df = _labelled(metrics).assign(acc=100 * metrics["accuracy"],
                                   mmacs=metrics["macs_per_image"] / 1e6)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.scatterplot(data=df, x="mmacs", y="acc", hue="label", hue_order=LABEL_ORDER,
                    palette=PALETTE, s=70, ax=ax)
    ax.set_xscale("log")
    ax.set(xlabel="multiply-accumulates per image (millions, log scale)",
           ylabel="test accuracy (%)", title="Accuracy against inference cost")
    ax.legend(title="")
    return _png(fig)


VARIANT_MARKERS = {"PyTorch fp32": "s", "ONNX fp32": "o", "ONNX int8": "^"}


def fig_ship(ship: pd.DataFrame) -> bytes:
    """Test accuracy against single-image latency (one thread) of every
    deployment variant of the headline's models; the frontier joined."""
    df = ship.assign(
        label=pd.Categorical(ship["role"].map(ARM_LABELS), LABEL_ORDER, ordered=True),
        variant=[VARIANT_LABELS[(r, p)] for r, p in zip(ship["runtime"], ship["precision"])],
        acc=100 * ship["accuracy"])
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    front = df[df["frontier"]].sort_values("latency_ms_batch1")
    ax.plot(front["latency_ms_batch1"], front["acc"], color="#bbbbbb", lw=1.5, zorder=1,
            drawstyle="steps-post", label="frontier")
    sns.scatterplot(data=df, x="latency_ms_batch1", y="acc", hue="label", hue_order=LABEL_ORDER,
                    palette=PALETTE, style="variant", markers=VARIANT_MARKERS, s=80, ax=ax,
                    zorder=3)
    ax.set_xscale("log")
    ax.set(xlabel="latency, batch 1, one thread (ms, log scale)", ylabel="test accuracy (%)",
           title="What you would ship: accuracy against latency on the CPU")
    # Outside the axes: the models cluster in the corners a legend would take.
    ax.legend(title="", fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png(fig)


def fig_study(study: pd.DataFrame, arms: pd.DataFrame) -> bytes:
    """Every distilled setting's test accuracy (mean ± sd over seeds), per
    student, against that student's baseline and the teacher; the setting
    chosen on validation accuracy is marked."""
    students = list(dict.fromkeys(study["student"]))
    fig, axes = plt.subplots(len(students), 1, squeeze=False,
                             figsize=(7, 0.8 + 0.42 * study.groupby("student").size().max()
                                      * 1.0 + 0.6))
    teacher = arms.loc[arms["role"] == "teacher", "accuracy_mean"].iloc[0]
    for ax, student in zip(axes[:, 0], students):
        d = study[study["student"] == student].reset_index(drop=True)
        y = np.arange(len(d))
        colors = ["#dd8452" if c else "#4c72b0" for c in d["chosen"]]
        ax.errorbar(100 * d["accuracy_mean"], y, xerr=100 * d["accuracy_sd"].fillna(0),
                    fmt="none", ecolor="#999999", capsize=3)
        ax.scatter(100 * d["accuracy_mean"], y, c=colors, s=40, zorder=3)
        base = arms.loc[arms["arm"] == f"{student}/ce", "accuracy_mean"].iloc[0]
        ax.axvline(100 * base, color="#8c8c8c", ls="--", lw=1, label="student, CE only")
        ax.axvline(100 * teacher, color="#4c72b0", ls=":", lw=1, label="teacher")
        ax.set_yticks(y, list(d["label"]), fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="test accuracy (%)", title=f"Student {student}: every setting "
               "(orange: chosen on validation)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _knob_text(v) -> str:
    if _missing(v):
        return "–"
    if isinstance(v, (bool, np.bool_)) or v in ("True", "False"):
        return "on" if v in (True, "True") else "off"
    # The round-trip form of the setting names: two values never share a label.
    return fmt(v) if isinstance(v, (int, float)) else str(v)


def fig_heatmap(study: pd.DataFrame) -> bytes:
    """Mean test accuracy over each method's swept knobs, one panel per
    student and method: rows the first knob that varies, columns the others
    (from the method table, kdflow.distill.methods); the cell with the best
    validation accuracy is boxed."""
    groups = list(study.groupby(["student", "method"], sort=False))
    # One colour scale for all panels, so colours compare across methods.
    vmin, vmax = 100 * study["accuracy_mean"].min(), 100 * study["accuracy_mean"].max()
    fig, axes = plt.subplots(1, len(groups), squeeze=False,
                             figsize=(max(4.2, 3.6 * len(groups)), 3.4))
    for ax, ((student, method), d) in zip(axes[0], groups):
        knobs = [k for k in METHODS[method].knobs
                 if k.key in d and d[k.key].map(_knob_text).nunique() > 1]
        rows, cols = knobs[:1], knobs[1:]

        def key(r, ks):
            return ", ".join(_knob_text(r[k.key]) for k in ks) or "–"

        d = d.assign(row=[key(r, rows) for _, r in d.iterrows()],
                     col=[key(r, cols) for _, r in d.iterrows()],
                     acc=100 * d["accuracy_mean"])
        grid = d.pivot_table(index="row", columns="col", values="acc", sort=False)
        sns.heatmap(grid, ax=ax, annot=True, fmt=".2f", cmap="viridis", cbar=False,
                    vmin=vmin, vmax=vmax, annot_kws={"fontsize": 8})
        best = d.loc[d["val_accuracy_mean"].idxmax()]
        ax.add_patch(plt.Rectangle((list(grid.columns).index(best["col"]),
                                    list(grid.index).index(best["row"])), 1, 1,
                                   fill=False, edgecolor="#dd8452", lw=2.5))
        ax.set(title=f"{student}, {METHODS[method].label}",
               xlabel=", ".join(k.key for k in cols) or "", ylabel=rows[0].key if rows else "")
    fig.suptitle("Mean test accuracy (%) per setting; box: best on validation", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def commits(prov: pd.DataFrame) -> list[dict]:
    """Every distinct (kdflow commit, dirty flag) that trained a model shown,
    with how many models each trained, most first."""
    df = prov.assign(commit=prov["kdflow_commit"].fillna("unknown").astype(str),
                     dirty=prov["kdflow_dirty"].astype(str))
    counts = df.groupby(["commit", "dirty"], sort=False).size().reset_index(name="models")
    return counts.sort_values("models", ascending=False, kind="stable").to_dict("records")


def _provenance(prov: pd.DataFrame, experiment: dict) -> dict:
    first = prov.drop(columns=["seed", "arm", "source"]).iloc[0].to_dict()
    return {
        "Python": first.get("python"), "torch": first.get("torch"),
        "torchvision": first.get("torchvision"), "Snakemake": first.get("snakemake"),
        "training devices": ", ".join(sorted(set(prov["device_name"].astype(str)))),
        # What engine.precision (auto by default) gave on those machines;
        # checkpoints from before the record existed have no column.
        "training precision": ", ".join(sorted(set(prov["precision"].dropna().astype(str))))
        if "precision" in prov else None,
        "trained": f"{prov['date'].min()} – {prov['date'].max()}",
        "config hash (sha256, first 12)": config_hash(experiment),
        "dataset archive md5": experiment.get("data", {}).get("md5"),
        "dataset source": experiment.get("data", {}).get("url"),
    }


def _subset(experiment: dict) -> dict | None:
    """data.subset when it shrinks the data (the report's banner), else None."""
    data = experiment.get("data", {})
    subset = data.get("subset") or {}
    if not (subset.get("train") or subset.get("test")):
        return None
    return {"dataset": data.get("dataset", "the dataset"), **subset}


# The aggregate's and ship step's JSON records among the report's inputs.
JSON_TABLES = ("headline", "ship_verdict")


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("kdflow.analysis", "templates"),
                      autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined)
    env.filters.update(pct=pct, signed_pct=signed_pct, num=num)
    return env


def render_macro(name: str, *args) -> str:
    """One macro of templates/sentences.html.j2 rendered on its own (the
    report's deciding sentences), e.g. render_macro("ship_sentence", ship)."""
    return getattr(_environment().get_template("sentences.html.j2").module, name)(*args)


def protocol_differences(published: dict, experiment: dict, head: dict) -> list[str]:
    """How this run's protocol differs from the one behind the published
    numbers (report.published.protocol), one sentence each: training
    images, what picks the kept epoch, and the teacher."""
    proto = published.get("protocol") or {}
    out = []
    data = experiment.get("data", {})
    val = data.get("val_size")
    if proto.get("train_images") and val:
        out.append(f"Training images: the published numbers train on {proto['train_images']:,}; "
                   f"here {val:,} of the training images are held out as the validation split "
                   "(data.val_size) that picks each model's kept epoch, so models train on "
                   f"{val:,} fewer.")
    if proto.get("selected_on") == "test":
        out.append("Selection: the published numbers report the best test accuracy over the "
                   "epochs, which flatters every number; here the kept epoch is the best on "
                   "validation and the test set is scored once.")
    elif proto.get("selected_on") == "last":
        out.append("Selection: the published numbers are the last epoch's; here the kept "
                   "epoch is the best on validation.")
    tr = head.get("teacher") or {}
    if proto.get("teacher") == "released":
        mine = ("one teacher imported from outside" if tr.get("source") else
                "one teacher trained here and shared by every seed" if tr.get("shared") else
                "a teacher of its own per seed, trained here")
        out.append(f"Teacher: the published students distil from one released teacher; "
                   f"here {mine}.")
    elif proto.get("teacher") == "per_seed" and tr.get("shared"):
        out.append("Teacher: the published numbers train a teacher per seed; here one teacher "
                   "is shared by every seed.")
    return out


def render_report(tables: dict[str, str], out: str, title: str, experiment: dict,
                  figures: dict[str, str] | None = None, published: dict | None = None) -> None:
    """tables: paths of the aggregate step's CSV files and headline JSON.
    figures: where to also write figures as PNG files, by name (see FIGURES).
    published: config report.published, the accuracies (%) by role that a
    preset reproduces, shown beside the measured ones."""
    t = {k: pd.read_csv(v) for k, v in tables.items() if k not in JSON_TABLES}
    head = json.loads(Path(tables["headline"]).read_text())
    shipped = (json.loads(Path(tables["ship_verdict"]).read_text())
               if tables.get("ship_verdict") else None)
    sns.set_theme(style="whitegrid", context="notebook")
    # The headline figures compare three arms: teacher, a plain student and
    # the distilled setting chosen on validation (head["arms"]).
    # ... measured on the headline's stage (the confirmation seeds, if any).
    view = {k: headline_view(t[k], head["arms"], head["stage"])
            for k in ("metrics", "history", "per_class", "confusion", "calibration", "arms")}
    arms = _labelled(view["arms"])
    figure_paths = figures or {}
    ship = t.get("ship", pd.DataFrame())
    settings_per_student = int(t["study"].groupby("student").size().max())
    draw = {
        "accuracy": lambda: fig_accuracy(view["metrics"]),
        "paired": lambda: fig_paired(t["gain"]),
        "curves": lambda: fig_curves(view["history"]),
        "agreement": lambda: fig_agreement(view["history"]),
        "per_class": lambda: fig_per_class(view["per_class"]),
        "confusion": lambda: fig_confusion(view["confusion"]),
        "reliability": lambda: fig_reliability(view["calibration"], arms),
        "efficiency": lambda: fig_efficiency(view["metrics"]),
        "study": lambda: fig_study(t["study"], t["arms"][t["arms"]["stage"] == "selection"]),
        "heatmap": lambda: fig_heatmap(t["study"]),
        "ship": lambda: fig_ship(ship),
    }
    # Only figures with something to show (kdflow.analysis.figures.shown),
    # the same list the workflow declares as the report's outputs.
    names = shown(settings_per_student, not ship.empty)
    if set(figure_paths) - set(names):
        raise KdflowError(f"figures {sorted(set(figure_paths) - set(names))} were asked for, "
                          f"but these results have something to show only in {sorted(names)}; "
                          "rerun the aggregate")
    figures = {name: draw[name]() for name in names}
    for name, path in figure_paths.items():
        atomic.write_bytes(path, figures[name])
    jobs = t["jobs"]
    cost = (jobs.groupby(["job", "arm"], sort=False)["wall_seconds"]
            .agg(["count", "sum", "mean"]).reset_index())
    study = t["study"]
    ranking = study[study["best_of_method"]].sort_values("method_rank")
    chosen = study[study["chosen"]].iloc[0].to_dict()

    html = _environment().get_template("report.html.j2").render(
        title=title,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        head=head,
        test=head["paired_test"],
        arms=arms.to_dict("records"),
        gain=t["gain"].to_dict("records"),
        metrics=t["metrics"].to_dict("records"),
        cost=cost.to_dict("records"),
        study=study.to_dict("records"),
        ranking=ranking.to_dict("records"),
        chosen=chosen,
        all_arms=t["arms"].to_dict("records"),
        total_hours=jobs["wall_seconds"].sum() / 3600,
        labels=ARM_LABELS,
        figures={k: "data:image/png;base64," + base64.b64encode(v).decode()
                 for k, v in figures.items()},
        subset=_subset(experiment),
        published={k: v for k, v in (published or {}).items() if v is not None},
        experiment_yaml=yaml.safe_dump(experiment, sort_keys=False),
        provenance=_provenance(t["provenance"], experiment),
        commits=commits(t["provenance"]),
        sources=tables,
        settings_per_student=settings_per_student,
        ship=ship.to_dict("records"),
        shipped=shipped,
        differences=protocol_differences(published or {}, experiment, head),
        methods_used=[{"name": m.name, "label": m.label, "reference": m.reference,
                       "knobs": [k.key for k in m.knobs]}
                      for m in METHODS.values() if m.name in set(study["method"])],
    )
    atomic.write_text(out, html)
    log.info("wrote %s (%.0f kB)", out, len(html) / 1e3)

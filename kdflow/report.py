"""The HTML report: seaborn figures embedded in one Jinja2-rendered file.

Everything shown is read from the tables the aggregate step wrote, and the
report lists those files, so each number can be traced back.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import logging
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape  # noqa: E402

from kdflow.aggregate import ARM_LABELS, ARM_ORDER  # noqa: E402

log = logging.getLogger(__name__)

PALETTE = {"teacher": "#4c72b0", "student_baseline": "#8c8c8c", "student_kd": "#dd8452"}


def pct(x, digits: int = 2) -> str:
    """A fraction as a percentage, or an en dash when undefined (n = 1 sd)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.{digits}f}"


def signed_pct(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.{digits}f}"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fig_accuracy(metrics: pd.DataFrame) -> str:
    """Test accuracy of each arm: one dot per seed, mean ± sd beside it."""
    df = metrics.assign(acc=100 * metrics["accuracy"],
                        label=metrics["arm"].map(ARM_LABELS))
    order = [ARM_LABELS[a] for a in ARM_ORDER]
    palette = {ARM_LABELS[a]: c for a, c in PALETTE.items()}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.stripplot(data=df, x="label", y="acc", hue="label", order=order,
                  palette=palette, size=7, jitter=0.08, ax=ax, legend=False)
    sns.pointplot(data=df, x="label", y="acc", order=order, errorbar="sd",
                  color="black", markers="_", markersize=18, linestyle="none",
                  capsize=0.15, ax=ax)
    ax.set(xlabel="", ylabel="test accuracy (%)",
           title="Test accuracy per seed (dots) and mean ± sd")
    return _png(fig)


def fig_gain(gain: pd.DataFrame) -> str:
    """Baseline and KD student of each seed, joined: the paired comparison."""
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for _, r in gain.iterrows():
        ax.plot([0, 1], [100 * r["student_baseline"], 100 * r["student_kd"]],
                color="#dd8452" if r["gain"] > 0 else "#8c8c8c", marker="o")
        ax.annotate(f"seed {int(r['seed'])}", (1.03, 100 * r["student_kd"]),
                    fontsize=8, va="center")
    ax.set_xticks([0, 1], [ARM_LABELS["student_baseline"], ARM_LABELS["student_kd"]])
    ax.set_xlim(-0.3, 1.4)
    ax.set(ylabel="test accuracy (%)", title="Same seed, with and without KD")
    sns.despine(ax=ax)
    return _png(fig)


def fig_curves(history: pd.DataFrame) -> str:
    """Train and validation accuracy per epoch, mean with a band of ± sd."""
    long = history.melt(id_vars=["seed", "arm", "epoch"],
                        value_vars=["train_accuracy", "val_accuracy"],
                        var_name="split", value_name="acc")
    long["acc"] *= 100
    long["split"] = long["split"].map({"train_accuracy": "train",
                                       "val_accuracy": "validation"})
    long["label"] = long["arm"].map(ARM_LABELS)
    palette = {ARM_LABELS[a]: c for a, c in PALETTE.items()}
    g = sns.relplot(data=long, x="epoch", y="acc", hue="label", col="split",
                    kind="line", errorbar="sd", palette=palette,
                    hue_order=[ARM_LABELS[a] for a in ARM_ORDER],
                    height=3.4, aspect=1.2, marker="o")
    g.set_axis_labels("epoch", "accuracy (%)")
    for ax in g.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    g.set_titles("{col_name}")
    g.legend.set_title("")
    return _png(g.figure)


def fig_agreement(history: pd.DataFrame) -> str | None:
    """How closely each student imitates its teacher on validation images."""
    if "val_teacher_agreement" not in history:
        return None
    df = history.dropna(subset=["val_teacher_agreement"]).copy()
    df["agreement"] = 100 * df["val_teacher_agreement"]
    df["label"] = df["arm"].map(ARM_LABELS)
    palette = {ARM_LABELS[a]: c for a, c in PALETTE.items()}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    sns.lineplot(data=df, x="epoch", y="agreement", hue="label", errorbar="sd",
                 palette=palette, marker="o", ax=axes[0])
    axes[0].set(ylabel="top-1 agreement (%)", title="Agreement with the teacher")
    sns.lineplot(data=df, x="epoch", y="val_teacher_kl", hue="label", errorbar="sd",
                 palette=palette, marker="o", ax=axes[1], legend=False)
    axes[1].set(ylabel="KL(teacher ‖ student)", title="Divergence from the teacher")
    axes[0].legend(title="")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def render_report(tables: dict[str, str], out: str, title: str, experiment: dict) -> None:
    """tables: paths of the aggregate step's metrics, history, arms, gain
    (CSV) and headline (JSON) files."""
    metrics = pd.read_csv(tables["metrics"])
    history = pd.read_csv(tables["history"])
    arms = pd.read_csv(tables["arms"])
    gain = pd.read_csv(tables["gain"])
    head = json.loads(Path(tables["headline"]).read_text())
    sns.set_theme(style="whitegrid", context="notebook")

    arms["label"] = arms["arm"].map(ARM_LABELS)
    prov = pd.read_csv(tables["provenance"])
    provenance = prov.drop(columns=["seed", "arm", "source"]).iloc[0].to_dict()
    provenance["models trained on"] = ", ".join(sorted(set(prov["device_name"].astype(str))))

    env = Environment(loader=PackageLoader("kdflow", "templates"),
                      autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined)
    env.filters["pct"] = pct
    env.filters["signed_pct"] = signed_pct
    html = env.get_template("report.html.j2").render(
        title=title,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        head=head,
        arms=arms.to_dict("records"),
        gain=gain.to_dict("records"),
        metrics=metrics.to_dict("records"),
        labels=ARM_LABELS,
        figures={
            "accuracy": fig_accuracy(metrics),
            "gain": fig_gain(gain),
            "curves": fig_curves(history),
            "agreement": fig_agreement(history),
        },
        experiment_yaml=yaml.safe_dump(experiment, sort_keys=False),
        provenance=provenance,
        sources=tables,
    )
    tmp = f"{out}.part"
    Path(tmp).write_text(html)
    os.replace(tmp, out)
    log.info("wrote %s (%.0f kB)", out, len(html) / 1e3)

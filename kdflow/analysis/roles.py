"""The roles of the headline comparison, and the rows of a table that play them."""

from __future__ import annotations

import pandas as pd

# The three roles of the headline comparison: the teacher, a plain student
# and the distilled setting chosen on validation accuracy.
ARM_ORDER = ["teacher", "student_baseline", "student_kd"]
ARM_LABELS = {
    "teacher": "Teacher",
    "student_baseline": "Student (CE only)",
    "student_kd": "Student (distilled)",
}


def headline_view(df: pd.DataFrame, chosen: dict[str, str], stage: str) -> pd.DataFrame:
    """The rows of the three chosen arms in the headline's stage, relabelled
    by role (teacher, student_baseline, student_kd), for the headline tables
    and figures."""
    by_path = {path: role for role, path in chosen.items()}
    out = df[df["arm"].astype(str).isin(by_path) & (df["stage"] == stage)].copy()
    out["arm"] = pd.Categorical(out["arm"].astype(str).map(by_path), ARM_ORDER, ordered=True)
    return out.sort_values(["arm"] + (["seed"] if "seed" in out else []),
                           kind="stable").reset_index(drop=True)

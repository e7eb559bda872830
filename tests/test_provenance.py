"""Provenance per commit: the report lists the kdflow commit of every model
and warns when a run's models come from more than one. On a finished run's
tables (the chance_run fixture, tests/conftest.py)."""

import pandas as pd

from kdflow.workflow.config import validate
from tests.helpers.workflow import report_tables


def test_report_lists_every_commit_and_warns_on_more_than_one(chance_run, tmp_path):
    from kdflow.analysis.report import render_report

    workdir, config = chance_run
    summary = workdir / "results/summary"
    tables = report_tables(summary)
    one = tmp_path / "one.html"
    render_report(tables, str(one), "t", validate(config))
    assert 'id="commits-warning"' not in one.read_text()
    prov = pd.read_csv(summary / "provenance.csv")
    prov.loc[0, "kdflow_commit"] = "0123456789abcdef0123456789abcdef01234567"
    prov.to_csv(tmp_path / "provenance.csv", index=False)
    tables["provenance"] = str(tmp_path / "provenance.csv")
    two = tmp_path / "two.html"
    render_report(tables, str(two), "t", validate(config))
    html = two.read_text()
    assert 'id="commits-warning"' in html and "2 different" in html
    listed = html.split('id="commits"', 1)[1].split("</table>", 1)[0]
    assert "0123456789abcdef" in listed
    assert str(pd.read_csv(summary / "provenance.csv")["kdflow_commit"].iloc[1]) in listed

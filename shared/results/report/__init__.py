"""Result tables, statistics and plots from the run store.

``loco_table`` / ``write_loco_report``: the LOCO table per held-out centre with its mean and pooled rows.
``write_report``: every table of the paper's analysis (per fold, centre, backbone and method, for each
protocol), the severity results, the paired tests of MDMT against its baselines, and PNG plots.
docs/report.md describes each output file and how its numbers are computed.

Modules: records (reading units from the store; method and protocol order), tables (prognosis and severity
tables), stats (bootstrap AUC intervals, paired tests), formatting (markdown / LaTeX), plots (PNG figures),
loco (the LOCO table and loco.csv / loco.md), write (write_report).
"""

from __future__ import annotations

from mdmt.results.report.formatting import (
    HEADERS,
    PERCENT_METRICS,
    display_frame,
    tests_markdown,
    to_markdown_table,
    write_table,
)
from mdmt.results.report.loco import TABLE_METRICS, loco_table, to_markdown, write_loco_report
from mdmt.results.report.plots import plot_centres, plot_learning_curves, plot_roc
from mdmt.results.report.records import (
    LOCAL,
    LOCAL_PREFIX,
    METHOD_ORDER,
    PROTOCOL_ORDER,
    PROTOCOL_TITLES,
    finished_units,
    learning_curves,
    method_group,
    prognosis_records,
    sort_rows,
    trains,
    unit_prognosis,
)
from mdmt.results.report.stats import (
    BASELINES,
    SUMMARIES,
    TESTED_METRICS,
    TREATMENT,
    compare_methods,
    mean_auc_ci,
    mean_auc_interval,
    paired_test,
    stars,
)
from mdmt.results.report.tables import (
    SUMMARY_METRICS,
    PrognosisTables,
    fold_spread,
    group_local,
    mean_over_backbones,
    method_table,
    prognosis_tables,
    severity_summary,
    severity_table,
    summarise,
)
from mdmt.results.report.write import METHOD_NOTE, write_report

__all__ = [
    "BASELINES",
    "HEADERS",
    "LOCAL",
    "LOCAL_PREFIX",
    "METHOD_NOTE",
    "METHOD_ORDER",
    "PERCENT_METRICS",
    "PROTOCOL_ORDER",
    "PROTOCOL_TITLES",
    "SUMMARIES",
    "SUMMARY_METRICS",
    "TABLE_METRICS",
    "TESTED_METRICS",
    "TREATMENT",
    "PrognosisTables",
    "compare_methods",
    "display_frame",
    "finished_units",
    "fold_spread",
    "group_local",
    "learning_curves",
    "loco_table",
    "mean_auc_ci",
    "mean_auc_interval",
    "mean_over_backbones",
    "method_group",
    "method_table",
    "paired_test",
    "plot_centres",
    "plot_learning_curves",
    "plot_roc",
    "prognosis_records",
    "prognosis_tables",
    "severity_summary",
    "severity_table",
    "sort_rows",
    "stars",
    "summarise",
    "tests_markdown",
    "to_markdown",
    "to_markdown_table",
    "trains",
    "unit_prognosis",
    "write_loco_report",
    "write_report",
    "write_table",
]

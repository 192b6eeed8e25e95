"""Result tables, statistics and plots from the run store.

``loco_table`` / ``write_loco_report``: the LOCO table per held-out centre with its mean and pooled rows.
``write_report``: every table of the paper's analysis (per fold, centre, backbone and method, for each
protocol), the severity results, the paired tests of MDMT against its baselines, and PNG plots.
docs/report.md describes each output file and how its numbers are computed.

Modules: records (reading units from the store; method and protocol order; pooled validation AUC per round),
tables (prognosis and severity tables), stats (bootstrap AUC intervals, paired tests at two levels of pairing,
effect sizes with t and cluster bootstrap intervals, the federation gap), formatting (markdown / LaTeX), plots
(PNG figures), loco (the LOCO table and loco.csv / loco.md), validation (validation AUC per method and
backbone), ceiling (a synthetic federation's oracle ceiling), write (write_report).
"""

from __future__ import annotations

from mdmt.results.report.ceiling import oracle_ceilings, read_ceiling, resolve_fed_dir, unit_fed_dir
from mdmt.results.report.formatting import (
    HEADERS,
    PERCENT_METRICS,
    display_frame,
    metric_value,
    tests_markdown,
    to_markdown_table,
    write_table,
)
from mdmt.results.report.loco import TABLE_METRICS, loco_table, to_markdown, write_loco_report
from mdmt.results.report.plots import plot_centres, plot_learning_auc, plot_learning_curves, plot_roc
from mdmt.results.report.records import (
    LOCAL,
    LOCAL_PREFIX,
    METHOD_ORDER,
    PROTOCOL_ORDER,
    PROTOCOL_TITLES,
    finished_units,
    hist_aucs,
    learning_curves,
    method_group,
    prognosis_records,
    sort_rows,
    train_validation,
    trains,
    unit_prognosis,
    validation_aucs,
)
from mdmt.results.report.stats import (
    BASELINES,
    COMPARISONS,
    GAP_COMPARISONS,
    GAP_METRICS,
    LEVELS,
    SPREAD_COMPARED,
    SUMMARIES,
    TESTED_METRICS,
    TREATMENT,
    cluster_bootstrap_ci,
    compare_methods,
    effect_size,
    gap_table,
    mean_auc_ci,
    mean_auc_interval,
    mean_diff_ci,
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
from mdmt.results.report.validation import mean_validation_curves, unit_validation, validation_table
from mdmt.results.report.write import METHOD_NOTE, write_report

__all__ = [
    "BASELINES",
    "COMPARISONS",
    "GAP_COMPARISONS",
    "GAP_METRICS",
    "HEADERS",
    "LEVELS",
    "LOCAL",
    "LOCAL_PREFIX",
    "METHOD_NOTE",
    "METHOD_ORDER",
    "PERCENT_METRICS",
    "PROTOCOL_ORDER",
    "PROTOCOL_TITLES",
    "SPREAD_COMPARED",
    "SUMMARIES",
    "SUMMARY_METRICS",
    "TABLE_METRICS",
    "TESTED_METRICS",
    "TREATMENT",
    "PrognosisTables",
    "cluster_bootstrap_ci",
    "compare_methods",
    "display_frame",
    "effect_size",
    "finished_units",
    "fold_spread",
    "gap_table",
    "group_local",
    "hist_aucs",
    "learning_curves",
    "loco_table",
    "mean_auc_ci",
    "mean_auc_interval",
    "mean_diff_ci",
    "mean_over_backbones",
    "mean_validation_curves",
    "method_group",
    "method_table",
    "metric_value",
    "oracle_ceilings",
    "paired_test",
    "plot_centres",
    "plot_learning_auc",
    "plot_learning_curves",
    "plot_roc",
    "prognosis_records",
    "prognosis_tables",
    "read_ceiling",
    "resolve_fed_dir",
    "severity_summary",
    "severity_table",
    "sort_rows",
    "stars",
    "summarise",
    "tests_markdown",
    "to_markdown",
    "to_markdown_table",
    "train_validation",
    "trains",
    "unit_fed_dir",
    "unit_prognosis",
    "unit_validation",
    "validation_aucs",
    "validation_table",
    "write_loco_report",
    "write_report",
    "write_table",
]

"""Formatting result frames for reading: cell strings (rates in %, AUC with its interval), readable headers,
markdown and LaTeX tables, and the markdown of the paired tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PERCENT_METRICS = ("acc", "f1", "gmean", "gmean_weighted", "sensitivity", "specificity")
HEADERS = {
    "acc": "ACC",
    "f1": "F1 (weighted)",
    "gmean": "G-mean (sqrt TPR x TNR)",
    "gmean_weighted": "G-mean (imblearn weighted)",
    "auc": "AUC [95% CI]",
    "sensitivity": "sens",
    "specificity": "spec",
    "n_backbones": "backbones",
    "n_folds": "folds",
    "site_models": "site models",
    "val_acc": "val ACC",
    "val_f1": "val F1",
    "test_acc": "test ACC",
    "test_f1": "test F1",
    "val_n": "val n",
    "test_n": "test n",
    "t": "t",
    "t_p": "p (t)",
    "t_stars": "sig (t)",
    "w": "W",
    "w_p": "p (W)",
    "w_stars": "sig (W)",
    "mean_a": "mean A",
    "mean_b": "mean B",
    "alternative": "H1",
    "method_a": "A",
    "method_b": "B",
    "diff": "A - B",
    "diff_ci": "95% CI (t)",
    "boot_ci": "95% CI (cluster bootstrap)",
    "dz": "dz",
    "fed_dir": "fed-dir",
    "oracle_acc": "oracle ACC",
    "oracle_auc": "oracle AUC",
    "val_auc_selected": "val AUC (selected round)",
    "val_auc_last": "val AUC (last round)",
    "n_units": "units",
    "n_above_chance": "units with val AUC CI > 0.5",
}
# columns in a metric's units, formatted by the row's 'metric' (percentage points or AUC decimals)
METRIC_VALUED = ("mean_a", "mean_b", "diff", "diff_lo", "diff_hi", "boot_lo", "boot_hi")
SIGNED = ("diff", "diff_lo", "diff_hi", "boot_lo", "boot_hi")


def _header(col: str) -> str:
    if col.endswith(("_fold_mean", "_fold_std")):
        metric, how = col.rsplit("_fold_", 1)
        return f"{_header(metric).split(' [')[0]} fold {'sd' if how == 'std' else 'mean'}"
    return HEADERS.get(col, col)


def _base(col: str) -> str:
    for affix in ("_fold_mean", "_fold_std"):
        col = col.removesuffix(affix)
    return col.removeprefix("val_").removeprefix("test_").removeprefix("oracle_")


def metric_value(metric: str, v, signed: bool = False) -> str:
    """A value in ``metric``'s units: rates in % (differences in percentage points), AUC to 3 decimals."""
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return "-"
    sign = "+" if signed else ""
    return f"{100 * v:{sign}.1f}" if _base(metric) in PERCENT_METRICS else f"{v:{sign}.3f}"


def _interval(metric: str, lo, hi) -> str:
    if pd.isna(lo) or pd.isna(hi):
        return "-"
    return f"[{metric_value(metric, lo, True)}, {metric_value(metric, hi, True)}]"


def _cell(col: str, v) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, bool):
        base = _base(col)
        if base in PERCENT_METRICS:
            return f"{100 * v:.1f}"
        if base.startswith("auc") or col in ("threshold", "mean_a", "mean_b", "t", "w", "dz"):
            return f"{v:.3f}"
        if col.endswith("_p"):
            return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"
        return str(int(v)) if float(v).is_integer() else f"{v:.3f}"
    return str(v)


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for markdown and LaTeX: rates in %, AUC with its interval, readable headers."""
    df = df.drop(columns=[c for c in ("hist", "cm") if c in df.columns]).reset_index(drop=True)
    out = pd.DataFrame({c: [_cell(c, v) for v in df[c]] for c in df.columns}, index=range(len(df)))
    if "metric" in df.columns:  # differences and means in the row's metric's units
        for c in (c for c in METRIC_VALUED if c in df.columns):
            out[c] = [metric_value(m, v, c in SIGNED) for m, v in zip(df["metric"], df[c])]
        for lo, hi, name in (("diff_lo", "diff_hi", "diff_ci"), ("boot_lo", "boot_hi", "boot_ci")):
            if lo in df.columns:
                out[lo] = [_interval(m, a, b) for m, a, b in zip(df["metric"], df[lo], df[hi])]
                out = out.drop(columns=[hi]).rename(columns={lo: name})
    if "auc_lo" in df.columns:
        has = df["auc_lo"].notna().to_numpy()
        out.loc[has, "auc"] = [
            f"{a} [{lo}, {hi}]"
            for a, lo, hi in zip(out.loc[has, "auc"], out.loc[has, "auc_lo"], out.loc[has, "auc_hi"])
        ]
        out = out.drop(columns=["auc_lo", "auc_hi"])
    return out.rename(columns=_header)


def to_markdown_table(df: pd.DataFrame) -> str:
    shown = display_frame(df)
    if shown.empty:
        return "(no rows)"
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def write_table(df: pd.DataFrame, out_dir: Path, stem: str, title: str, note: str = "") -> tuple[list[Path], str]:
    """<stem>.csv (raw values), <stem>.md and <stem>.tex (formatted). Returns the paths and the markdown."""
    raw = df.drop(columns=[c for c in ("hist", "cm") if c in df.columns])
    paths = [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "tex")]
    raw.to_csv(paths[0], index=False)
    md = f"## {title}\n\n" + (f"{note}\n\n" if note else "") + to_markdown_table(df) + "\n"
    paths[1].write_text(md)
    paths[2].write_text(display_frame(df).to_latex(index=False, escape=True, caption=title, label=f"tab:{stem}"))
    return paths, md


def _p(p, star: str) -> str:
    return "-" if pd.isna(p) else f"{_cell('t_p', p)}{star}"


def _diff(metric: str, row) -> str:
    """The mean difference with its t-interval, when there is one."""
    ci = _interval(metric, row["diff_lo"], row["diff_hi"])
    return metric_value(metric, row["diff"], True) + ("" if ci == "-" else f" {ci}")


def tests_markdown(tests: pd.DataFrame, title: str) -> str:
    """The paired tests, one table per comparison: a row per summary and metric with both levels of pairing
    (pairs of backbone and seed; backbones, seeds averaged first) side by side."""
    lines = [
        f"## {title}",
        "",
        "One-tailed paired tests (scipy.stats.ttest_rel and scipy.stats.wilcoxon), H1 per row. 'pairs': one pair",
        "per backbone and seed; 'backbones': the seeds of a backbone averaged first. A - B: mean difference (ACC,",
        "F1, G-mean in percentage points; AUC in AUC units) with its two-sided 95% t-interval; cluster bootstrap:",
        "95% interval resampling backbones (all seeds of a drawn backbone together). dz = mean / sd of the",
        "differences. Stars: * p<0.05, ** p<0.01, *** p<0.001. Every column: tests.csv.",
        "",
    ]
    for name, grp in tests.groupby("comparison", sort=False):
        first = grp.iloc[0]
        lines.append(f"### {name} (A = {first['method_a']}, B = {first['method_b']})")
        lines.append("")
        if first["level"] == "-":
            lines += [str(first["note"]), ""]
            continue
        lines += [
            "| on | metric | H1 | pairs n | A | B | A - B [95% CI t] | cluster bootstrap | dz | p (t) | p (W) "
            "| backbones n | A - B [95% CI t] | p (t) | p (W) | note |",
            "|" + "---|" * 16,
        ]
        for (summary, metric), rows in grp.groupby(["summary", "metric"], sort=False):
            by = {r["level"]: r for _, r in rows.iterrows()}
            pr, bb = by["pairs"], by["backbones"]
            h1 = {"greater": "A > B", "less": "A < B"}.get(pr["alternative"], "-")
            notes = [f"{lv}: {r['note']}" for lv, r in by.items() if r["note"]]
            if pr["note"] and pr["note"] == bb["note"]:
                notes = [pr["note"]]
            lines.append(
                f"| {summary} | {_header(metric).split(' [')[0]} | {h1} | {pr['n']} "
                f"| {metric_value(metric, pr['mean_a'])} | {metric_value(metric, pr['mean_b'])} "
                f"| {_diff(metric, pr)} | {_interval(metric, pr['boot_lo'], pr['boot_hi'])} | {_cell('dz', pr['dz'])} "
                f"| {_p(pr['t_p'], pr['t_stars'])} | {_p(pr['w_p'], pr['w_stars'])} | {bb['n']} "
                f"| {_diff(metric, bb)} | {_p(bb['t_p'], bb['t_stars'])} | {_p(bb['w_p'], bb['w_stars'])} "
                f"| {'; '.join(notes)} |"
            )
        lines.append("")
    return "\n".join(lines)

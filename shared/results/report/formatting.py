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
}


def _header(col: str) -> str:
    if col.endswith(("_fold_mean", "_fold_std")):
        metric, how = col.rsplit("_fold_", 1)
        return f"{_header(metric).split(' [')[0]} fold {'sd' if how == 'std' else 'mean'}"
    return HEADERS.get(col, col)


def _base(col: str) -> str:
    for affix in ("_fold_mean", "_fold_std"):
        col = col.removesuffix(affix)
    return col.removeprefix("val_").removeprefix("test_")


def _cell(col: str, v) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, bool):
        base = _base(col)
        if base in PERCENT_METRICS:
            return f"{100 * v:.1f}"
        if base.startswith("auc") or col in ("threshold", "mean_a", "mean_b", "t", "w"):
            return f"{v:.3f}"
        if col.endswith("_p"):
            return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"
        return str(int(v)) if float(v).is_integer() else f"{v:.3f}"
    return str(v)


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for markdown and LaTeX: rates in %, AUC with its interval, readable headers."""
    df = df.drop(columns=[c for c in ("hist", "cm") if c in df.columns])
    out = pd.DataFrame({c: [_cell(c, v) for v in df[c]] for c in df.columns}, index=range(len(df)))
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


def tests_markdown(tests: pd.DataFrame, title: str) -> str:
    """The paired tests, naming the test, n and p in every row."""
    lines = [
        f"## {title}",
        "",
        "One-tailed paired tests across backbones (scipy.stats.ttest_rel and scipy.stats.wilcoxon). H1 for the",
        "pooled metric and the fold mean: MDMT greater; for the fold std: MDMT less (more stable).",
        "Stars: * p<0.05, ** p<0.01, *** p<0.001.",
        "",
        "| comparison | metric | on | H1 | n | mean A | mean B | paired t-test | Wilcoxon signed-rank | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tests.itertuples(index=False):
        t = "-" if pd.isna(r.t_p) else f"t={r.t:.3f}, n={r.n}, p={_cell('t_p', r.t_p)}{r.t_stars}"
        w = "-" if pd.isna(r.w_p) else f"W={r.w:.1f}, n={r.n}, p={_cell('w_p', r.w_p)}{r.w_stars}"
        h1 = {"greater": "A > B", "less": "A < B"}.get(r.alternative, "-")
        lines.append(
            f"| {r.comparison} | {_header(r.metric).split(' [')[0]} | {r.summary} | {h1} | {r.n} "
            f"| {_cell(r.metric, r.mean_a)} | {_cell(r.metric, r.mean_b)} | {t} | {w} | {r.note} |"
        )
    return "\n".join(lines) + "\n"

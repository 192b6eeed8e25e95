"""The LOCO table: one row per held-out centre at its selected round, with 'mean' and 'pooled' rows per
model, its markdown, and loco.csv / loco.md."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.ml.metrics import POOLED_AUC_BOUND, cm_at_bin, edge_p, prognosis_summary
from mdmt.results.report.records import unit_prognosis
from mdmt.store import RunStore

TABLE_METRICS = (
    "threshold",
    "n",
    "acc",
    "f1",
    "gmean",
    "gmean_weighted",
    "auc",
    "auc_lo",
    "auc_hi",
    "sensitivity",
    "specificity",
)


def loco_table(store: RunStore, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (method, backbone, held-out centre) at its selected round, plus 'mean' and 'pooled' rows.

    'mean' averages the per-centre metrics; 'pooled' computes them on the held-out centres' predictions
    pooled together (summed confusion counts and score histograms). A centre's AUC is the exact one its
    site computed; the pooled AUC and every interval come from the histograms (see mdmt.ml.metrics).
    """
    rows = []
    pooled: dict[tuple[str, str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for u in store.units():
        if u["protocol"] != "loco" or u["fold"] == "-" or u["status"] != "done" or u["best_round"] is None:
            continue
        k, scored = unit_prognosis(store, u)
        if not scored:
            continue
        _, hist, auc = scored[0]
        cm = cm_at_bin(hist, k)
        m = prognosis_summary(cm, hist, n_boot=n_boot, seed=seed, auc=auc)
        m["threshold"] = edge_p(k)
        rows.append(
            {
                "method": u["method"],
                "backbone": u["backbone"],
                "seed": u["seed"],
                "centre": u["fold"],
                "round": u["best_round"],
                **{k: m[k] for k in TABLE_METRICS},
            }
        )
        pooled.setdefault((u["method"], u["backbone"], u["seed"]), []).append((cm, hist))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["method", "backbone", "seed", "centre", "round", *TABLE_METRICS])
    out = []
    for (method, backbone, seed_), grp in df.groupby(["method", "backbone", "seed"], sort=True):
        grp = grp.sort_values("centre")
        out.append(grp)
        mean = {k: float(grp[k].mean()) for k in TABLE_METRICS}
        mean["n"] = int(grp["n"].sum())
        mean["auc_lo"] = mean["auc_hi"] = float("nan")  # an interval of a mean of centres is not a bootstrap CI
        out.append(
            pd.DataFrame(
                [{"method": method, "backbone": backbone, "seed": seed_, "centre": "mean", "round": np.nan, **mean}]
            )
        )
        parts = pooled[(method, backbone, seed_)]
        m = prognosis_summary(sum(p[0] for p in parts), sum(p[1] for p in parts), n_boot=n_boot, seed=seed)
        m["threshold"] = float("nan")  # each centre keeps its own fold's threshold
        out.append(
            pd.DataFrame(
                [
                    {
                        "method": method,
                        "backbone": backbone,
                        "seed": seed_,
                        "centre": "pooled",
                        "round": np.nan,
                        **{k: m[k] for k in TABLE_METRICS},
                    }
                ]
            )
        )
    return pd.concat(out, ignore_index=True)


def _fmt(v: float, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def to_markdown(df: pd.DataFrame) -> str:
    head = (
        "| method | backbone | centre | n | ACC | F1 (weighted) | G-mean | G-mean (weighted) | AUC [95% CI] "
        "| sens | spec | round | threshold |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in df.itertuples(index=False):
        auc = _fmt(r.auc, False)
        if not pd.isna(r.auc_lo):
            auc += f" [{_fmt(r.auc_lo, False)}, {_fmt(r.auc_hi, False)}]"
        rnd = "" if pd.isna(r.round) else str(int(r.round))
        lines.append(
            f"| {r.method} | {r.backbone} | {r.centre} | {int(r.n)} | {_fmt(r.acc)} | {_fmt(r.f1)} | "
            f"{_fmt(r.gmean)} | {_fmt(r.gmean_weighted)} | {auc} | {_fmt(r.sensitivity)} | "
            f"{_fmt(r.specificity)} | {rnd} | {'' if pd.isna(r.threshold) else f'{r.threshold:.3f}'} |"
        )
    return "\n".join(lines)


def write_loco_report(
    store: RunStore, out_dir: Path, n_boot: int = 1000, seed: int = 0
) -> tuple[pd.DataFrame, Path, Path]:
    df = loco_table(store, n_boot=n_boot, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "loco.csv", out_dir / "loco.md"
    df.to_csv(csv_path, index=False)
    md_path.write_text(
        "# Leave-one-centre-out results (prognosis, held-out centre at the selected round)\n\n"
        "ACC, F1, G-mean, sensitivity and specificity in %; 'mean' averages the centres, 'pooled' scores the\n"
        "held-out centres' predictions together. G-mean = sqrt(TPR x TNR); G-mean (weighted) = imbalanced-learn's\n"
        "weighted variant used by the paper's code. A centre's AUC is exact (computed by its site on its own\n"
        "predictions); the pooled AUC comes from the centres' score histograms (logit bins), within\n"
        f"{POOLED_AUC_BOUND} of the exact pooled AUC on the demo run. AUC interval: stratified bootstrap of the\n"
        f"histograms, {n_boot} resamples.\n"
        "threshold: the P(SEVERE) cut-off, chosen on the training sites' validation (Youden's J) unless fixed\n"
        "by the run config's 'threshold'; the held-out centre never influences it.\n\n" + to_markdown(df) + "\n"
    )
    return df, csv_path, md_path


def report_run(
    store: RunStore, workspace: Path, methods: tuple[str, ...], backbones: tuple[str, ...]
) -> tuple[pd.DataFrame, str]:
    """Write ``<workspace>/reports/loco.md`` and ``loco.csv`` from the store; return the rows of the run's
    methods and backbones, and their markdown table with the files' paths (what ``mdmt loco`` and the
    ServerApp print)."""
    df, csv_path, md_path = write_loco_report(store, Path(workspace) / "reports")
    shown = df[df["method"].isin(methods) & df["backbone"].isin(backbones)]
    return shown, f"{to_markdown(shown)}\n\ntable: {md_path} and {csv_path}; store: {store.path}"

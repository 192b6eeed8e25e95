"""The comparison page: pooled results per method and backbone, and the report's table and paired tests."""

from __future__ import annotations

from dash import html

from mdmt.results.dashboard import data as D
from mdmt.results.dashboard import figures as F
from mdmt.results.dashboard.layout import count, graph, grid, is_nan, note, num3, pct
from mdmt.results.dashboard.loco_page import pending_notes


def page_compare(sources: list[D.Source], version: str) -> list:
    runs, problems = D.list_runs(sources)
    table, p2 = D.loco_frame(sources, version)
    out: list = [html.H2("Comparison")]
    out += [note(p, "error") for p in problems + p2]
    out += paper_section(sources, version)
    cmp = D.comparison(table)
    if cmp.empty:
        out += pending_notes(runs)
        out.append(html.Div("No finished LOCO unit yet.", className="empty", id="no-compare"))
        return out
    multi = len(sources) > 1
    out.append(html.H3("Pooled AUC [95% CI] / ACC: method x backbone"))
    backbones = sorted(cmp["backbone"].unique())
    keys = ["store", "method", "seed"] if (multi or cmp["seed"].nunique() > 1) else ["method"]
    rows = []
    for key, g in cmp.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        cells = []
        for b in backbones:
            hit = g[g["backbone"] == b]
            if hit.empty:
                cells.append("")
            else:
                r = hit.iloc[0]
                ci = "" if is_nan(r["pooled_auc_lo"]) else f" [{num3(r['pooled_auc_lo'])}, {num3(r['pooled_auc_hi'])}]"
                cells.append(f"{num3(r['pooled_auc'])}{ci} / {pct(r['pooled_acc'])}")
        rows.append([*[str(k) for k in key], *cells])
    out.append(grid([*keys, *backbones], rows, "compare-table"))
    out.append(graph(F.comparison_figure(cmp), "compare-graph"))
    out.append(html.H3("Mean of centres and pooled, per method and backbone"))
    head = (["store"] if multi else []) + [
        "method",
        "backbone",
        "seed",
        "centres",
        "mean ACC",
        "mean F1",
        "mean G-mean",
        "mean AUC",
        "pooled n",
        "pooled ACC",
        "pooled F1",
        "pooled G-mean",
        "pooled AUC [95% CI]",
    ]
    rows = []
    for _, r in cmp.iterrows():
        ci = "" if is_nan(r["pooled_auc_lo"]) else f" [{num3(r['pooled_auc_lo'])}, {num3(r['pooled_auc_hi'])}]"
        rows.append(
            ([r["store"]] if multi else [])
            + [
                r["method"],
                r["backbone"],
                str(int(r["seed"])),
                r["centres"],
                pct(r["mean_acc"]),
                pct(r["mean_f1"]),
                pct(r["mean_gmean"]),
                num3(r["mean_auc"]),
                count(r["pooled_n"]),
                pct(r["pooled_acc"]),
                pct(r["pooled_f1"]),
                pct(r["pooled_gmean"]),
                num3(r["pooled_auc"]) + ci,
            ]
        )
    out.append(grid(head, rows, "compare-long"))
    return out


def paper_section(sources: list[D.Source], version: str) -> list:
    """The report's table (per protocol, the mean over backbones of each backbone's pooled predictions) and
    the one-tailed paired tests of MDMT against STL and FT across backbones."""
    methods, tests, problems = D.paper_tables(sources, version)
    out: list = [note(p, "error") for p in problems]
    if methods.empty:
        return out
    multi = len(sources) > 1
    out.append(html.H3("Mean over backbones (pooled fold predictions), as in mdmt report"))
    head = (["store"] if multi else []) + [
        "protocol",
        "method",
        "backbones",
        "n",
        "ACC",
        "F1 (weighted)",
        "G-mean",
        "G-mean (weighted)",
        "AUC [95% CI]",
    ]
    rows = []
    for _, r in methods.iterrows():
        ci = "" if is_nan(r["auc_lo"]) else f" [{num3(r['auc_lo'])}, {num3(r['auc_hi'])}]"
        rows.append(
            ([r["store"]] if multi else [])
            + [
                r["protocol"],
                r["method"],
                str(int(r["n_backbones"])),
                count(r["n"]),
                pct(r["acc"]),
                pct(r["f1"]),
                pct(r["gmean"]),
                pct(r["gmean_weighted"]),
                num3(r["auc"]) + ci,
            ]
        )
    out.append(grid(head, rows, "paper-table"))
    out.append(
        html.H3("Paired tests: (backbone, seed) pairs and backbones (seeds averaged); one-tailed t-test and Wilcoxon")
    )
    head = (["store"] if multi else []) + [
        "protocol",
        "comparison",
        "metric",
        "on",
        "pairs of",
        "H1",
        "n",
        "A - B [95% CI]",
        "t-test p",
        "Wilcoxon p",
        "note",
    ]
    rows = []
    for _, r in tests.iterrows():
        h1 = {"greater": "A > B", "less": "A < B"}.get(r["alternative"], "-")
        tp = "-" if is_nan(r["t_p"]) else f"{r['t_p']:.3f}{r['t_stars']}"
        wp = "-" if is_nan(r["w_p"]) else f"{r['w_p']:.3f}{r['w_stars']}"
        diff = r.get("diff", float("nan"))
        if is_nan(diff):
            shown = "-"
        elif r["metric"] == "auc":
            shown = f"{diff:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]"
        else:
            shown = f"{100 * diff:+.1f} [{100 * r['diff_lo']:+.1f}, {100 * r['diff_hi']:+.1f}] pp"
        rows.append(
            ([r["store"]] if multi else [])
            + [
                r["protocol"],
                r["comparison"],
                str(r["metric"]),
                str(r["summary"]),
                str(r.get("level", "-")),
                h1,
                str(int(r["n"])),
                shown,
                tp,
                wp,
                r["note"] or "",
            ]
        )
    out.append(grid(head, rows, "tests-table"))
    return out

"""Plotly figures for the dashboard, built from the frames of mdmt.results.dashboard.data (no Dash here)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"  # local fonts only


def site_colours(sites) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(set(sites)))}


def _layout(fig: go.Figure, title: str = "", height: int = 320, **kw) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.01, "font": {"size": 14}},
        height=height,
        margin={"l": 50, "r": 20, "t": 40 if title else 20, "b": 40},
        font={"family": FONT, "size": 12},
        legend={"font": {"size": 11}},
        uirevision="keep",
        **kw,
    )
    return fig


def _round_axis(fig: go.Figure, rounds) -> None:
    """Integer ticks only (a two-round run must not show 1, 1.5, 2)."""
    top = max([int(r) for r in rounds] or [1])
    fig.update_xaxes(title_text="round", tickmode="linear", tick0=0, dtick=max(1, math.ceil(top / 10)))


def empty(message: str, height: int = 120) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height=height)


def global_figure(gm: pd.DataFrame) -> go.Figure:
    """Pooled prognosis AUC/ACC and severity accuracy per round, one line per evaluated split."""
    if gm.empty:
        return empty("no evaluation yet")
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("prognosis AUC (pooled)", "prognosis ACC (pooled)", "severity accuracy (pooled)"),
    )
    for i, split in enumerate(sorted(gm["split"].unique())):
        g = gm[gm["split"] == split].sort_values("round")
        colour = PALETTE[i % len(PALETTE)]
        label = f"{split}: {g['sites'].iloc[-1]}"
        first = True
        for col, name in enumerate(("prog_auc", "prog_acc", "sev_acc"), start=1):
            if name in g and g[name].notna().any():
                fig.add_trace(
                    go.Scatter(
                        x=g["round"],
                        y=g[name],
                        mode="lines+markers",
                        name=label,
                        legendgroup=split,
                        showlegend=first,
                        line={"color": colour},
                    ),
                    row=1,
                    col=col,
                )
                first = False
    fig.update_yaxes(range=[0, 1.02])
    _round_axis(fig, gm["round"])
    return _layout(fig, height=300)


SITE_PANELS = (
    ("prognosis", "acc", "prognosis ACC"),
    ("prognosis", "f1", "prognosis F1"),
    ("prognosis", "gmean", "prognosis G-mean"),
    ("prognosis", "auc", "prognosis AUC"),
    ("severity", "acc", "severity accuracy"),
    ("severity", "f1", "severity F1"),
)


def site_metrics_figure(sm: pd.DataFrame, colours: dict[str, str] | None = None) -> go.Figure:
    """One panel per (task, metric), one line per site (and split)."""
    if sm.empty:
        return empty("no per-site evaluation yet")
    colours = colours or site_colours(sm["site"])
    fig = make_subplots(rows=2, cols=3, subplot_titles=[p[2] for p in SITE_PANELS], vertical_spacing=0.16)
    shown: set[str] = set()
    for k, (task, name, _) in enumerate(SITE_PANELS):
        if name not in sm:
            continue
        d = sm[(sm["task"] == task) & sm[name].notna()]
        for (site, split), g in d.groupby(["site", "split"], sort=True):
            g = g.sort_values("round")
            label = f"{site} ({split})"
            fig.add_trace(
                go.Scatter(
                    x=g["round"],
                    y=g[name],
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    showlegend=label not in shown,
                    line={"color": colours.get(site, "#7f7f7f"), "dash": "solid" if split == "val" else "dash"},
                ),
                row=k // 3 + 1,
                col=k % 3 + 1,
            )
            shown.add(label)
    fig.update_yaxes(range=[0, 1.02])
    _round_axis(fig, sm["round"])
    return _layout(fig, height=520)


def loss_figure(curves: dict[str, pd.DataFrame], colours: dict[str, str] | None = None) -> go.Figure:
    train, val, mon = curves["train"], curves["val"], curves["monitored"]
    if train.empty and val.empty and mon.empty:
        return empty("no losses recorded yet")
    colours = colours or site_colours(list(train["site"]) + list(val["site"]))
    fig = go.Figure()
    for site, g in train.groupby("site", sort=True):
        g = g.sort_values("round")
        fig.add_trace(
            go.Scatter(
                x=g["round"],
                y=g["value"],
                mode="lines+markers",
                name=f"{site} train",
                line={"color": colours.get(site, "#7f7f7f")},
            )
        )
    for (site, task, split), g in val.groupby(["site", "task", "split"], sort=True):
        g = g.sort_values("round")
        fig.add_trace(
            go.Scatter(
                x=g["round"],
                y=g["value"],
                mode="lines+markers",
                name=f"{site} {task} {split}",
                line={"color": colours.get(site, "#7f7f7f"), "dash": "dot"},
                marker={"symbol": "diamond"},
            )
        )
    for task, g in mon.groupby("task", sort=True):
        g = g.sort_values("round")
        fig.add_trace(
            go.Scatter(
                x=g["round"],
                y=g["value"],
                mode="lines+markers",
                name=f"monitored ({task} val)",
                line={"color": "black", "width": 3},
            )
        )
    fig.update_yaxes(title_text="loss", rangemode="tozero")
    _round_axis(fig, list(train["round"]) + list(val["round"]) + list(mon["round"]))
    return _layout(fig, "solid: training loss per site; dotted: evaluation loss; black: the monitored loss", 360)


def bytes_figure(b: pd.DataFrame, colours: dict[str, str] | None = None) -> go.Figure:
    """Megabytes sent to (down) and received from (up) each site per round."""
    if b.empty:
        return empty("bytes not recorded")
    colours = colours or site_colours(b["site"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("sent to the site (MB)", "returned by the site (MB)"))
    for col, name in enumerate(("bytes_down", "bytes_up"), start=1):
        d = b[b["name"] == name]
        for site, g in d.groupby("site", sort=True):
            fig.add_trace(
                go.Bar(
                    x=g["round"],
                    y=g["value"] / 1e6,
                    name=site,
                    legendgroup=site,
                    showlegend=col == 1,
                    marker={"color": colours.get(site, "#7f7f7f")},
                ),
                row=1,
                col=col,
            )
    fig.update_layout(barmode="stack")
    _round_axis(fig, b["round"])
    return _layout(fig, height=300)


def epsilon_figure(e: pd.DataFrame, colours: dict[str, str] | None = None) -> go.Figure:
    colours = colours or site_colours(e["site"])
    fig = go.Figure()
    for site, g in e.groupby("site", sort=True):
        g = g.sort_values("round")
        fig.add_trace(
            go.Scatter(
                x=g["round"],
                y=g["value"],
                mode="lines+markers",
                name=site,
                line={"color": colours.get(site, "#7f7f7f")},
            )
        )
    fig.update_yaxes(title_text="epsilon (spent so far)", rangemode="tozero")
    _round_axis(fig, e["round"])
    return _layout(fig, height=280)


def roc_figure(curves: list[dict], title: str, colours: dict[str, str] | None = None) -> go.Figure:
    """ROC curves of one method's held-out centres (and their pooled curve, dotted black), with each
    centre's operating point at its decision threshold (open circle)."""
    colours = colours or site_colours(c["centre"] for c in curves)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            line={"color": "#bbbbbb", "dash": "dash"},
            showlegend=False,
            hoverinfo="skip",
        )
    )
    for c in curves:
        if not len(c["fpr"]):
            continue
        pooled = c["centre"] == "pooled"
        colour = "black" if pooled else colours.get(c["centre"], PALETTE[0])
        fig.add_trace(
            go.Scatter(
                x=c["fpr"],
                y=c["tpr"],
                mode="lines",
                name=f"{c['centre']} (AUC {c['auc']:.3f})",
                line={"color": colour, "width": 3 if pooled else 2, "dash": "dot" if pooled else "solid"},
            )
        )
        cm = np.asarray(c["cm"])
        neg, pos = cm[0].sum(), cm[1].sum()
        if neg and pos and c["threshold"] is not None:
            fig.add_trace(
                go.Scatter(
                    x=[cm[0, 1] / neg],
                    y=[cm[1, 1] / pos],
                    mode="markers",
                    showlegend=False,
                    marker={"color": colour, "size": 10, "symbol": "circle-open", "line": {"width": 2}},
                    hovertext=f"{c['centre']}: threshold {c['threshold']:.3f}",
                    hoverinfo="text",
                )
            )
    if len(fig.data) == 1:
        return empty(f"{title}: no ROC curve (a held-out centre needs both MILD and SEVERE patients)")
    fig.update_xaxes(title_text="1 - specificity", range=[0, 1], constrain="domain")
    fig.update_yaxes(title_text="sensitivity", range=[0, 1], scaleanchor="x", scaleratio=1, constrain="domain")
    return _layout(fig, title, height=380)


def comparison_figure(cmp: pd.DataFrame) -> go.Figure:
    """Pooled LOCO AUC with its bootstrap interval, per method, one bar group per backbone."""
    if cmp.empty:
        return empty("no finished LOCO units yet")
    fig = go.Figure()
    for i, (backbone, g) in enumerate(cmp.groupby("backbone", sort=True)):
        label = g["method"] + (" s" + g["seed"].astype(str) if g["seed"].nunique() > 1 else "")
        if g["store"].nunique() > 1:
            label = g["store"] + ": " + label
        fig.add_trace(
            go.Bar(
                x=label,
                y=g["pooled_auc"],
                name=backbone,
                marker={"color": PALETTE[i % len(PALETTE)]},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (g["pooled_auc_hi"] - g["pooled_auc"]).fillna(0),
                    "arrayminus": (g["pooled_auc"] - g["pooled_auc_lo"]).fillna(0),
                },
            )
        )
    fig.update_yaxes(title_text="pooled AUC [95% CI]", range=[0, 1])
    fig.update_layout(barmode="group", showlegend=True, legend_title_text="backbone")
    return _layout(fig, height=340)

"""The report's PNG figures: pooled ROC curves, per-centre bars and learning curves (matplotlib, Agg canvas)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.ml.metrics import auc_from_hist, roc_from_hist
from mdmt.results.report.records import method_group, sort_rows


def _ordered_methods(methods: pd.Series) -> list[str]:
    return sort_rows(pd.DataFrame({"method": pd.unique(methods)}), ["method"])["method"].tolist()


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure  # deferred: matplotlib (the Agg canvas; no pyplot state, no display needed)

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def plot_roc(records: pd.DataFrame, title: str, path: Path) -> Path:
    """One ROC curve per method from its histograms pooled over backbones, seeds and folds."""
    fig, (ax,) = _figure(5.5, 5)
    groups = records["method"].map(method_group)
    for method in _ordered_methods(groups):
        hist = np.sum(np.stack(records.loc[groups == method, "hist"]), axis=0)
        if hist[0].sum() == 0 or hist[1].sum() == 0:
            continue
        fpr, tpr = roc_from_hist(hist)
        ax.plot(fpr, tpr, label=f"{method} (AUC {auc_from_hist(hist):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def plot_centres(centres: pd.DataFrame, title: str, path: Path) -> Path:
    """Grouped bars: ACC and AUC per centre (mean over backbones), one bar per method."""
    methods = _ordered_methods(centres["method"])
    labels = sorted(centres["centre"].unique(), key=str)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(methods))
    fig, axes = _figure(max(6.0, 0.9 * len(labels) * max(1, len(methods)) / 2 + 3), 6.5, nrows=2)
    for ax, metric, label in zip(axes, ("acc", "auc"), ("ACC", "AUC")):
        for i, method in enumerate(methods):
            values = centres[centres["method"] == method].set_index("centre")[metric].reindex(labels)
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, values.to_numpy(dtype=float), width, label=method)
        ax.set(ylabel=label, ylim=(0, 1), xticks=x, xticklabels=labels)
    axes[-1].set_xlabel("centre")
    fig.suptitle(title)
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(methods)), fontsize="small"
    )
    fig.savefig(path, dpi=110)
    return path


def _method_panels(groups: list[str]):
    """A figure of one panel per method, three to a row."""
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    return _figure(4.2 * ncols, 3.2 * nrows, ncols=ncols, nrows=nrows)


def _save_panels(fig, axes, used: int, title: str, path: Path) -> Path:
    for ax in axes[used:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def plot_learning_curves(curves: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per method, one line per unit: the monitored validation loss per round; a dot marks the selected
    round."""
    from matplotlib.ticker import MaxNLocator  # deferred: matplotlib

    groups = _ordered_methods(curves["method"].map(method_group))
    fig, axes = _method_panels(groups)
    for ax, group in zip(axes, groups):
        units = curves[curves["method"].map(method_group) == group]
        for _, u in units.groupby("unit_id", sort=False):
            label = f"{u['backbone'].iloc[0]} fold {u['fold'].iloc[0]} seed {u['seed'].iloc[0]}"
            u = u.dropna(subset=["monitored_loss"])
            (line,) = ax.plot(u["round"], u["monitored_loss"], lw=1, alpha=0.8, label=label)
            best = u[u["round"] == u["best_round"]]
            ax.plot(best["round"], best["monitored_loss"], "o", ms=4, color=line.get_color())
        ax.set(title=group, xlabel="round", ylabel="monitored val loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if units["unit_id"].nunique() <= 8:
            ax.legend(fontsize="x-small")
    return _save_panels(fig, axes, len(groups), title, path)


def plot_learning_auc(mean_curves: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per method, one line per backbone: the training sites' pooled validation AUC per round, the
    mean over that backbone's units (seeds and folds; validation.mean_validation_curves); dashed: chance."""
    from matplotlib.ticker import MaxNLocator  # deferred: matplotlib

    groups = _ordered_methods(mean_curves["method"]) or ["-"]
    fig, axes = _method_panels(groups)
    for ax, group in zip(axes, groups):
        here = mean_curves[mean_curves["method"] == group]
        for backbone, c in here.groupby("backbone", sort=True):
            ax.plot(c["round"], c["val_auc"], lw=1.2, label=str(backbone))
        ax.axhline(0.5, ls="--", color="grey", lw=1)
        ax.set(title=group, xlabel="round", ylabel="pooled val AUC", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if here["backbone"].nunique():
            ax.legend(fontsize="x-small")
    return _save_panels(fig, axes, len(groups), title, path)

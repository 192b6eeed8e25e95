"""mdmt.results.report on hand-made run stores: every number checked against scikit-learn / SciPy computed here
from the same fabricated counts, plus the files and the CLI path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from imblearn.metrics import geometric_mean_score
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from mdmt.ml.metrics import LEGACY_HIST_BINS, as_layout, auc_ci, auc_from_hist, edge_p
from mdmt.results import report
from mdmt.store import RunStore, UnitKey

N_BOOT = 50
# Scores are fabricated on 200 equal bins of P(SEVERE) (bin k: scores in [k / 200, (k + 1) / 200)) and written
# to the store in the histogram layout sites send (mdmt.ml.metrics.as_layout keeps order and counts).
HIST_BINS = LEGACY_HIST_BINS
CENTRES = ("A", "B", "C")
BACKBONES = ("resnet18", "densenet121", "mobilenet_v2")
SEPARATION = {
    "stl_prognosis": 12,
    "ft": 18,
    "mdmt": 30,
    "centralised_mdmt": 35,
    "local:A": 5,
    "local:B": 8,
    "local:C": 10,
}
ROOT = Path(__file__).resolve().parents[1]


# ---- fabricated evaluations --------------------------------------------------------------------------------
def score_hist(rng: np.random.Generator, n0: int, n1: int, sep: float) -> np.ndarray:
    """2 x 200 counts of P(SEVERE): MILD centred below 0.5, SEVERE above, ``sep`` bins from the middle."""
    bins = np.arange(HIST_BINS)

    def probs(centre: float) -> np.ndarray:
        p = np.exp(-0.5 * ((bins - centre) / 35.0) ** 2)
        return p / p.sum()

    return np.stack([rng.multinomial(n0, probs(100 - sep)), rng.multinomial(n1, probs(100 + sep))])


def prog_stat(site: str, split: str, hist: np.ndarray) -> dict:
    cm = [[int(hist[0, :100].sum()), int(hist[0, 100:].sum())], [int(hist[1, :100].sum()), int(hist[1, 100:].sum())]]
    return {
        "site": site,
        "task": "prognosis",
        "split": split,
        "n": int(hist.sum()),
        "loss_sum": 1.0,
        "cm": cm,
        "hist": as_layout(hist).tolist(),
    }


def sev_stat(site: str, split: str, cm: np.ndarray) -> dict:
    return {
        "site": site,
        "task": "severity",
        "split": split,
        "n": int(cm.sum()),
        "loss_sum": 1.0,
        "cm": cm.tolist(),
        "hist": None,
    }


def severity_cm(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 6, size=(4, 4)) + np.diag(rng.integers(8, 15, size=4))


def samples(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample truth, score bin and score centre behind a histogram (what a site would have held)."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    y = np.concatenate([np.zeros(hist[0].sum(), int), np.ones(hist[1].sum(), int)])
    b = np.concatenate([np.repeat(np.arange(HIST_BINS), hist[0]), np.repeat(np.arange(HIST_BINS), hist[1])])
    return y, b, (b + 0.5) / HIST_BINS


def expected(hist: np.ndarray, k: int) -> dict:
    """The metrics a site would compute from its own samples, calling SEVERE when the score bin >= k."""
    y, b, s = samples(hist)
    p = (b >= k).astype(int)
    return {
        "n": len(y),
        "acc": accuracy_score(y, p),
        "f1": f1_score(y, p, average="weighted"),
        "gmean": math.sqrt(recall_score(y, p, pos_label=1) * recall_score(y, p, pos_label=0)),
        "gmean_weighted": geometric_mean_score(y, p, average="weighted"),
        "auc": roc_auc_score(y, s),
    }


def expected_multiclass(cm: np.ndarray) -> tuple[float, float]:
    t, p = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    y, yp = np.repeat(t.ravel(), cm.ravel()), np.repeat(p.ravel(), cm.ravel())
    return accuracy_score(y, yp), f1_score(y, yp, average="weighted")


# ---- a LOCO store ----------------------------------------------------------------------------------------
PROGNOSIS_METHODS = ("stl_prognosis", "ft", "mdmt", "centralised_mdmt", "local:A", "local:B", "local:C")


def build_loco_store(path: Path, backbones=BACKBONES, methods=PROGNOSIS_METHODS) -> dict:
    """Three centres A-C plus BRIXIA, three backbones; every method; round 2 selected (round 1 is noise).
    Returns the held-out histograms and severity matrices written at the selected round."""
    rng = np.random.default_rng(7)
    truth: dict = {"held": {}, "sev": {}}
    st = RunStore(path)

    def unit(method, backbone, fold, train, evals, stats_at_best, metrics_extra=()):
        key = UnitKey(method, backbone, "loco", fold, 0)
        st.start_unit(key, train, evals, {"threshold": "0.5", "method": method}, {})
        noise = [
            prog_stat(r["site"], r["split"], score_hist(rng, 5, 5, 0)) if r["task"] == "prognosis" else r
            for r in stats_at_best
        ]
        st.log_round(
            key, 1, [("*", "prognosis", "val", "monitored_loss", 0.9), ("B", "all", "train", "loss", 1.0)], noise, []
        )
        st.log_round(
            key,
            2,
            [("*", "prognosis", "val", "monitored_loss", 0.6), ("B", "all", "train", "loss", 0.7), *metrics_extra],
            stats_at_best,
            [("B", "train", "ok", "")],
        )
        st.finish_unit(key, "done", 2)

    for b_i, backbone in enumerate(backbones):
        for method in methods:
            for fold in CENTRES:
                train = [c for c in CENTRES if c != fold]
                if method.startswith("local:"):
                    if method[6:] == fold:
                        continue
                    train = [method[6:]]
                sep = SEPARATION[method] + 4 * b_i + 3 * CENTRES.index(fold)
                held = score_hist(rng, 40 + 10 * CENTRES.index(fold), 30, sep)
                truth["held"][(method, backbone, fold)] = held
                rows = [prog_stat(fold, "all", held)] + [
                    prog_stat(c, "val", score_hist(rng, 10, 10, sep)) for c in train
                ]
                if method in ("mdmt", "centralised_mdmt"):
                    val_cm, test_cm = severity_cm(rng), severity_cm(rng)
                    truth["sev"][(method, backbone, fold)] = (val_cm, test_cm)
                    rows += [sev_stat("BRIXIA", "val", val_cm), sev_stat("BRIXIA", "test", test_cm)]
                    train = [*train, "BRIXIA"]
                unit(method, backbone, fold, train, {fold: "all"}, rows)
        val_cm, test_cm = severity_cm(rng), severity_cm(rng)
        truth["sev"][("stl_severity", backbone, "-")] = (val_cm, test_cm)
        unit(
            "stl_severity",
            backbone,
            "-",
            ["BRIXIA"],
            {},
            [sev_stat("BRIXIA", "val", val_cm), sev_stat("BRIXIA", "test", test_cm)],
        )
    # units that must not count: a failed one and one still running
    st.start_unit(UnitKey("mdmt", "resnet18", "loco", "A", 1), ["B"], {}, {}, {})
    st.finish_unit(UnitKey("mdmt", "resnet18", "loco", "A", 1), "failed", None, "boom")
    st.start_unit(UnitKey("mdmt", "resnet18", "loco", "B", 1), ["A"], {}, {}, {})
    st.close()
    return truth


@pytest.fixture(scope="module")
def loco_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("loco")
    truth = build_loco_store(d / "store.sqlite")
    st = RunStore(d / "store.sqlite", readonly=True)
    try:
        summary = report.write_report(st, d / "out", n_boot=N_BOOT, seed=0)
    finally:
        st.close()
    return d, truth, summary


def _csv(d: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(d / "out" / name, dtype={"fold": str, "centre": str})


def _pooled_expected(truth, method, backbone) -> dict:
    return expected(sum(truth["held"][(method, backbone, c)] for c in CENTRES), 100)


# ---- prognosis tables ------------------------------------------------------------------------------------
def test_per_fold_rows_match_sklearn_at_the_selected_round(loco_report):
    d, truth, _ = loco_report
    folds = _csv(d, "folds_loco.csv")
    assert set(folds["method"]) == {"stl_prognosis", "ft", "mdmt", "centralised_mdmt", "local"}
    assert len(folds) == 5 * len(BACKBONES) * len(CENTRES)  # failed and running units left out
    row = folds[(folds.method == "mdmt") & (folds.backbone == "densenet121") & (folds.fold == "B")].iloc[0]
    exp = expected(truth["held"][("mdmt", "densenet121", "B")], 100)
    for k, v in exp.items():
        assert row[k] == pytest.approx(v), k
    assert row["round"] == 2 and row["threshold"] == 0.5


def test_local_models_grouped_by_mean_with_a_per_site_table(loco_report):
    d, truth, _ = loco_report
    folds, sites = _csv(d, "folds_loco.csv"), _csv(d, "local_sites_loco.csv")
    row = folds[(folds.method == "local") & (folds.backbone == "resnet18") & (folds.fold == "A")].iloc[0]
    per_site = [expected(truth["held"][(m, "resnet18", "A")], 100) for m in ("local:B", "local:C")]
    assert row["acc"] == pytest.approx(np.mean([e["acc"] for e in per_site]))
    assert row["auc"] == pytest.approx(np.mean([e["auc"] for e in per_site]))
    assert row["site_models"] == 2 and math.isnan(row["auc_lo"])
    assert set(sites["method"]) == {"local:A", "local:B", "local:C"} and len(sites) == 2 * len(CENTRES) * len(BACKBONES)


def test_backbone_table_pools_folds_and_keeps_fold_spread(loco_report):
    d, truth, _ = loco_report
    bb = _csv(d, "backbones_loco.csv")
    row = bb[(bb.method == "stl_prognosis") & (bb.backbone == "mobilenet_v2")].iloc[0]
    exp = _pooled_expected(truth, "stl_prognosis", "mobilenet_v2")
    for k, v in exp.items():
        assert row[k] == pytest.approx(v), k
    pooled = sum(truth["held"][("stl_prognosis", "mobilenet_v2", c)] for c in CENTRES)
    assert (row["auc_lo"], row["auc_hi"]) == pytest.approx(auc_ci(as_layout(pooled), n_boot=N_BOOT, seed=0))
    per_fold = [expected(truth["held"][("stl_prognosis", "mobilenet_v2", c)], 100)["acc"] for c in CENTRES]
    assert row["acc_fold_mean"] == pytest.approx(np.mean(per_fold))
    assert row["acc_fold_std"] == pytest.approx(np.std(per_fold, ddof=1))
    assert row["n_folds"] == 3


def test_method_table_is_the_mean_over_backbones_of_pooled_metrics(loco_report):
    d, truth, summary = loco_report
    mt = _csv(d, "methods_loco.csv")
    row = mt[mt.method == "mdmt"].iloc[0]
    exp = [_pooled_expected(truth, "mdmt", b) for b in BACKBONES]
    for k in ("acc", "f1", "gmean", "gmean_weighted", "auc"):
        assert row[k] == pytest.approx(np.mean([e[k] for e in exp])), k
    assert row["n_backbones"] == 3 and row["auc_lo"] < row["auc"] < row["auc_hi"]
    assert list(mt["method"]) == ["stl_prognosis", "ft", "mdmt", "centralised_mdmt", "local"]
    # every fold's held-out patients for a federated model; a single-site model never meets its own centre,
    # so 'local' counts the most patients one of them was scored on
    held = {c: int(truth["held"][("mdmt", "resnet18", c)].sum()) for c in CENTRES}
    assert mt.set_index("method").loc["mdmt", "n"] == sum(held.values())
    assert mt.set_index("method").loc["local", "n"] == max(sum(held.values()) - held[s] for s in CENTRES)
    md = (d / "out" / "methods_loco.md").read_text()
    assert "its n is the most patients one of them was scored on" in md
    assert f"| loco | mdmt | 3 | {exp[0]['n']} | {100 * np.mean([e['acc'] for e in exp]):.1f} |" in md
    assert "| loco | mdmt |" in summary and "methods_loco.tex" in summary
    assert "\\begin{tabular}" in (d / "out" / "methods_loco.tex").read_text()


def test_mean_auc_ci_reduces_to_auc_ci_and_covers_the_mean():
    rng = np.random.default_rng(1)
    h1, h2 = score_hist(rng, 60, 50, 20), score_hist(rng, 80, 30, 35)
    single = report.mean_auc_ci([as_layout(h1)], [1.0], n_boot=200, seed=3)
    assert single == pytest.approx(auc_ci(as_layout(h1), n_boot=200, seed=3))
    lo, hi = report.mean_auc_ci([as_layout(h1), as_layout(h2)], [1.0, 1.0], n_boot=400, seed=0)
    mean = (roc_auc_score(*samples(h1)[::2]) + roc_auc_score(*samples(h2)[::2])) / 2
    assert lo < mean < hi


def test_centre_table_and_loco_outputs(loco_report):
    d, truth, _ = loco_report
    centres = _csv(d, "centres_loco.csv")
    row = centres[(centres.method == "ft") & (centres.centre == "C")].iloc[0]
    assert row["acc"] == pytest.approx(
        np.mean([expected(truth["held"][("ft", b, "C")], 100)["acc"] for b in BACKBONES])
    )
    assert row["n_backbones"] == 3
    loco = _csv(d, "loco.csv")
    assert {"mean", "pooled"} <= set(loco["centre"]) and (d / "out" / "loco.md").is_file()
    pooled = loco[(loco.method == "mdmt") & (loco.backbone == "resnet18") & (loco.centre == "pooled")].iloc[0]
    assert pooled["acc"] == pytest.approx(_pooled_expected(truth, "mdmt", "resnet18")["acc"])


def test_centre_auc_is_the_one_its_site_sent_and_pooled_comes_from_histograms(tmp_path):
    """A store whose held-out sites sent their exact AUC (metric 'auc' of the centre's split): the LOCO
    table and the per-centre tables show it; the pooled row and the intervals use the histograms."""
    rng = np.random.default_rng(11)
    st = RunStore(tmp_path / "s.sqlite")
    held, sent = {}, {"A": 0.71234, "B": 0.65432}
    for fold, other in (("A", "B"), ("B", "A")):
        key = UnitKey("mdmt", "resnet18", "loco", fold, 0)
        st.start_unit(key, [other], {fold: "all"}, {"threshold": "0.5"}, {})
        held[fold] = score_hist(rng, 40, 30, 20)
        rows = [prog_stat(fold, "all", held[fold]), prog_stat(other, "val", score_hist(rng, 10, 10, 20))]
        st.log_round(key, 1, [(fold, "prognosis", "all", "auc", sent[fold])], rows, [])
        st.finish_unit(key, "done", 1)
    table = report.loco_table(st, n_boot=N_BOOT)
    records = report.prognosis_records(st, report.finished_units(st))
    st.close()
    by_centre = table.set_index("centre")
    assert by_centre.loc["A", "auc"] == sent["A"] and by_centre.loc["B", "auc"] == sent["B"]
    assert by_centre.loc["mean", "auc"] == pytest.approx((sent["A"] + sent["B"]) / 2)
    assert by_centre.loc["pooled", "auc"] == pytest.approx(expected(held["A"] + held["B"], 100)["auc"])
    assert by_centre.loc["A", "auc_lo"] == pytest.approx(auc_ci(as_layout(held["A"]), n_boot=N_BOOT, seed=0)[0])
    per_centre = report.summarise(records, ["method", "site"], n_boot=N_BOOT)
    assert sorted(per_centre["auc"]) == sorted(sent.values())


# ---- severity --------------------------------------------------------------------------------------------
def test_severity_on_validation_and_consensus_set(loco_report):
    d, truth, _ = loco_report
    sev = _csv(d, "severity.csv")
    assert set(sev["method"]) == {"stl_severity", "mdmt", "centralised_mdmt"}
    row = sev[(sev.method == "mdmt") & (sev.backbone == "resnet18") & (sev.fold == "C")].iloc[0]
    val_cm, test_cm = truth["sev"][("mdmt", "resnet18", "C")]
    assert (row["val_acc"], row["val_f1"]) == pytest.approx(expected_multiclass(val_cm))
    assert (row["test_acc"], row["test_f1"]) == pytest.approx(expected_multiclass(test_cm))
    assert row["test_n"] == test_cm.sum()
    summ = _csv(d, "severity_methods.csv")
    stl = summ[summ.method == "stl_severity"].iloc[0]
    assert stl["test_acc"] == pytest.approx(
        np.mean([expected_multiclass(truth["sev"][("stl_severity", b, "-")][1])[0] for b in BACKBONES])
    )


# ---- paired tests ----------------------------------------------------------------------------------------
def test_paired_tests_match_scipy(loco_report):
    d, truth, _ = loco_report
    tests = pd.read_csv(d / "out" / "tests.csv", keep_default_na=False, na_values=[""])
    pooled = {m: [_pooled_expected(truth, m, b)["f1"] for b in BACKBONES] for m in ("mdmt", "stl_prognosis")}
    row = tests[
        (tests.comparison == "mdmt vs stl_prognosis") & (tests.metric == "f1") & (tests.summary == "pooled")
    ].iloc[0]
    t = stats.ttest_rel(pooled["mdmt"], pooled["stl_prognosis"], alternative="greater")
    w = stats.wilcoxon(pooled["mdmt"], pooled["stl_prognosis"], alternative="greater")
    assert row["n"] == 3 and row["t"] == pytest.approx(t.statistic) and row["t_p"] == pytest.approx(t.pvalue)
    assert row["w_p"] == pytest.approx(w.pvalue) and row["alternative"] == "greater"

    def fold_std(method, backbone):
        return np.std([expected(truth["held"][(method, backbone, c)], 100)["auc"] for c in CENTRES], ddof=1)

    a = [fold_std("mdmt", b) for b in BACKBONES]
    b_ = [fold_std("ft", b) for b in BACKBONES]
    row = tests[(tests.comparison == "mdmt vs ft") & (tests.metric == "auc") & (tests.summary == "fold std")].iloc[0]
    assert row["alternative"] == "less"
    assert row["t_p"] == pytest.approx(stats.ttest_rel(a, b_, alternative="less").pvalue)
    md = (d / "out" / "tests.md").read_text()
    assert "ttest_rel" in md and "wilcoxon" in md
    assert f"| {t.pvalue:.3f}{report.stars(t.pvalue)} |" in md
    # one seed per backbone: both levels pair the same three backbones
    both = tests[(tests.comparison == "mdmt vs stl_prognosis") & (tests.metric == "f1") & (tests.summary == "pooled")]
    assert sorted(both["level"]) == ["backbones", "pairs"] and (both["n"] == 3).all()
    # the comparisons of federation: H1 less against centralised, greater against local; no fold std there
    fed = tests[tests.comparison == "federated vs centralised"]
    assert set(fed["alternative"]) == {"less"} and "fold std" not in set(fed["summary"])
    assert set(tests[tests.comparison == "federated vs local"]["alternative"]) == {"greater"}
    local = {
        b: np.mean(
            [expected(sum(truth["held"][(f"local:{s}", b, c)] for c in CENTRES if c != s), 100)["auc"] for s in CENTRES]
        )
        for b in BACKBONES
    }
    row = tests[
        (tests.comparison == "federated vs local")
        & (tests.metric == "auc")
        & (tests.summary == "pooled")
        & (tests.level == "pairs")
    ].iloc[0]
    assert row["mean_b"] == pytest.approx(np.mean(list(local.values())))
    gaps = pd.read_csv(d / "out" / "gaps_loco.csv")
    assert list(gaps["metric"]) == ["acc", "gmean", "gmean_weighted", "auc"] * 2 and (gaps["n"] == 3).all()
    gap = gaps[(gaps.comparison == "federated vs centralised") & (gaps.metric == "acc")].iloc[0]
    exp = [
        _pooled_expected(truth, "mdmt", b)["acc"] - _pooled_expected(truth, "centralised_mdmt", b)["acc"]
        for b in BACKBONES
    ]
    assert gap["diff"] == pytest.approx(np.mean(exp)) and gap["diff_lo"] < gap["diff"] < gap["diff_hi"]
    assert "price of federation" in (d / "out" / "report.md").read_text()


def test_paired_test_edge_cases_and_stars():
    one = report.paired_test([0.7], [0.6], "greater")
    assert one["n"] == 1 and "at least 2" in one["note"] and math.isnan(one["t_p"])
    same = report.paired_test([0.7, 0.6, 0.5], [0.7, 0.6, 0.5], "greater")
    assert "every difference is zero" in same["note"] and math.isnan(same["w_p"])
    shift = report.paired_test([0.8, 0.7, 0.6], [0.7, 0.6, 0.5], "greater")
    assert "t-test undefined" in shift["note"]
    assert shift["w_p"] == pytest.approx(stats.wilcoxon([0.8, 0.7, 0.6], [0.7, 0.6, 0.5], alternative="greater").pvalue)
    nan_pair = report.paired_test([0.8, np.nan, 0.6, 0.9], [0.7, 0.6, 0.5, 0.75], "greater")
    assert nan_pair["n"] == 3
    assert nan_pair["t_p"] == pytest.approx(
        stats.ttest_rel([0.8, 0.6, 0.9], [0.7, 0.5, 0.75], alternative="greater").pvalue
    )
    assert [report.stars(p) for p in (0.2, 0.04, 0.009, 0.0009, float("nan"))] == ["", "*", "**", "***", ""]


def backbone_frame(values: dict[str, np.ndarray], backbones=BACKBONES, seeds=(0, 1, 2)) -> pd.DataFrame:
    """A backbones table (one row per method, backbone, seed) whose every tested column of a method holds
    ``values[method]`` (backbone-major, seed-minor), plus an offset per summary."""
    rows = []
    for method, v in values.items():
        for i, (b, s) in enumerate((b, s) for b in backbones for s in seeds):
            row = {"protocol": "loco", "method": method, "backbone": b, "seed": s}
            for m in report.TESTED_METRICS:
                row |= {m: v[i], f"{m}_fold_mean": v[i] + 0.01, f"{m}_fold_std": 0.05 + v[i] / 10}
            rows.append(row)
    return pd.DataFrame(rows)


def test_two_levels_of_pairing_effect_sizes_and_intervals():
    rng = np.random.default_rng(5)
    base = 0.6 + 0.05 * rng.standard_normal(9)
    shift = 0.04 + 0.02 * rng.standard_normal(9)
    values = {"mdmt": base + shift, "stl_prognosis": base, "centralised_mdmt": base + shift + 0.03}
    tests = report.compare_methods(backbone_frame(values), n_boot=500, seed=1)
    sel = tests[(tests.comparison == "mdmt vs stl_prognosis") & (tests.metric == "auc") & (tests.summary == "pooled")]
    pairs, bbs = sel[sel.level == "pairs"].iloc[0], sel[sel.level == "backbones"].iloc[0]
    assert pairs["n"] == 9 and bbs["n"] == 3
    a, b = values["mdmt"], values["stl_prognosis"]
    t = stats.ttest_rel(a, b, alternative="greater")
    assert pairs["t_p"] == pytest.approx(t.pvalue) and pairs["t"] == pytest.approx(t.statistic)
    assert pairs["w_p"] == pytest.approx(stats.wilcoxon(a, b, alternative="greater").pvalue)
    assert pairs["diff"] == pytest.approx(np.mean(shift)) and pairs["diff_lo"] < np.mean(shift) < pairs["diff_hi"]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (pairs["diff_lo"], pairs["diff_hi"]) == pytest.approx((ci.low, ci.high))
    assert pairs["dz"] == pytest.approx(np.mean(shift) / np.std(shift, ddof=1))
    assert pairs["boot_lo"] <= pairs["diff"] <= pairs["boot_hi"]
    # backbones: the seeds of each backbone averaged first
    a3, b3 = a.reshape(3, 3).mean(axis=1), b.reshape(3, 3).mean(axis=1)
    assert bbs["t_p"] == pytest.approx(stats.ttest_rel(a3, b3, alternative="greater").pvalue)
    assert bbs["diff"] == pytest.approx(np.mean(a3 - b3)) and math.isnan(bbs["boot_lo"])
    # federated vs centralised: H1 less, the gap federated minus centralised
    fed = tests[(tests.comparison == "federated vs centralised") & (tests.metric == "acc") & (tests.level == "pairs")]
    assert set(fed["alternative"]) == {"less"} and set(fed["summary"]) == {"pooled", "fold mean"}
    row = fed[fed.summary == "pooled"].iloc[0]
    assert row["diff"] == pytest.approx(-0.03) and row["method_b"] == "centralised_mdmt"
    assert row["t_p"] is None or math.isnan(row["t_p"])  # every difference the same: no t-test, a note
    assert "every difference is the same" in row["note"] and row["diff_lo"] == row["diff_hi"] == pytest.approx(-0.03)
    # baselines without results: one row each
    for name, missing in (("mdmt vs ft", "ft"), ("federated vs local", "local")):
        rows = tests[tests.comparison == name]
        assert len(rows) == 1 and rows["note"].iloc[0] == f"not tested: no {missing} results"
    gaps = report.gap_table(tests)
    assert len(gaps[gaps.comparison == "federated vs centralised"]) == 4 and len(gaps) == 5
    md = report.tests_markdown(tests, "paired tests")
    assert "### federated vs centralised (A = mdmt, B = centralised_mdmt)" in md and "| A < B | 9 |" in md


def test_a_half_finished_model_is_not_paired():
    # one mdmt model has 4 of its 6 folds done (a sitting stopped mid-grid): its pair is left out and said so
    values = {"mdmt": np.linspace(0.70, 0.78, 9), "stl_prognosis": np.linspace(0.60, 0.66, 9)}
    frame = backbone_frame(values).assign(n_folds=6)
    frame.loc[(frame.method == "mdmt") & (frame.backbone == BACKBONES[0]) & (frame.seed == 0), "n_folds"] = 4
    tests = report.compare_methods(frame, n_boot=100, seed=0)
    sel = tests[(tests.comparison == "mdmt vs stl_prognosis") & (tests.metric == "acc") & (tests.summary == "pooled")]
    pairs, bbs = sel[sel.level == "pairs"].iloc[0], sel[sel.level == "backbones"].iloc[0]
    assert pairs["n"] == 8 and bbs["n"] == 3
    assert pairs["diff"] == pytest.approx(np.mean((values["mdmt"] - values["stl_prognosis"])[1:]))
    assert "1 pair(s) left out: a model with folds still to run" in pairs["note"]
    assert pairs["note"] == bbs["note"]


def test_cluster_bootstrap_resamples_backbones():
    # seeds differ within a backbone, every backbone has the same mean: a resample of whole backbones always
    # has that mean, so the interval collapses (a resample of single pairs would not)
    d = np.tile([0.0, 0.03, 0.06], 3)
    clusters = np.repeat(["a", "b", "c"], 3)
    assert report.cluster_bootstrap_ci(d, clusters, n_boot=300, seed=0) == pytest.approx((0.03, 0.03))
    # one backbone: every replicate is that backbone's mean difference
    values = {"mdmt": np.array([0.70, 0.74, 0.75]), "stl_prognosis": np.array([0.60, 0.61, 0.66])}
    tests = report.compare_methods(backbone_frame(values, backbones=("resnet18",)), n_boot=200, seed=0)
    row = tests[(tests.metric == "acc") & (tests.summary == "pooled") & (tests.level == "pairs")].iloc[0]
    mean = np.mean(values["mdmt"] - values["stl_prognosis"])
    assert row["n"] == 3 and row["diff"] == pytest.approx(mean)
    assert row["boot_lo"] == pytest.approx(mean) and row["boot_hi"] == pytest.approx(mean)
    assert row["diff_lo"] < mean < row["diff_hi"]  # the t-interval still treats the seeds as pairs
    bb = tests[(tests.metric == "acc") & (tests.summary == "pooled") & (tests.level == "backbones")].iloc[0]
    assert bb["n"] == 1 and "at least 2" in bb["note"]
    # between-backbone spread: the interval covers the mean, within the backbones' range
    d = np.repeat([0.01, 0.02, 0.06], 3) + np.tile([-0.001, 0.0, 0.001], 3)
    lo, hi = report.cluster_bootstrap_ci(d, clusters, n_boot=2000, seed=3)
    assert 0.01 - 0.001 <= lo < d.mean() < hi <= 0.06 + 0.001
    assert report.cluster_bootstrap_ci(d, clusters, n_boot=2000, seed=3) == (lo, hi)


def test_one_backbone_store_says_not_tested(tmp_path):
    rng = np.random.default_rng(0)
    st = RunStore(tmp_path / "s.sqlite")
    for method in ("mdmt", "stl_prognosis"):
        key = UnitKey(method, "resnet18", "loco", "A", 0)
        st.start_unit(key, ["B"], {"A": "all"}, {"threshold": "0.5"}, {})
        st.log_round(key, 1, [], [prog_stat("A", "all", score_hist(rng, 30, 30, 20))], [])
        st.finish_unit(key, "done", 1)
    summary = report.write_report(st, tmp_path / "out", n_boot=N_BOOT)
    st.close()
    tests = pd.read_csv(tmp_path / "out" / "tests.csv")
    stl = tests[tests.comparison == "mdmt vs stl_prognosis"]
    assert stl[stl.summary != "fold std"]["note"].str.contains("1 pair").all() and stl["t_p"].isna().all()
    assert stl[stl.summary == "fold std"]["note"].str.contains("0 pair.*1 without a value").all()
    assert tests[tests.comparison == "mdmt vs ft"]["note"].tolist() == ["not tested: no ft results"]
    assert "not tested" in (tmp_path / "out" / "tests.md").read_text() and "| loco | mdmt |" in summary


# ---- oracle ceiling ------------------------------------------------------------------------------------------
def small_store(path: Path, fed_dir: str, rng: np.random.Generator) -> None:
    """mdmt and stl_prognosis, one LOCO fold each, whose config names ``fed_dir``."""
    st = RunStore(path)
    for method in ("mdmt", "stl_prognosis"):
        key = UnitKey(method, "resnet18", "loco", "A", 0)
        st.start_unit(key, ["B"], {"A": "all"}, {"threshold": "0.5", "fed-dir": fed_dir}, {})
        st.log_round(key, 1, [], [prog_stat("A", "all", score_hist(rng, 30, 30, 20))], [])
        st.finish_unit(key, "done", 1)
    st.close()


def test_oracle_ceiling_from_synth_json_beside_the_results(tmp_path, monkeypatch):
    # a checkout: the store in docs/results/demo/, fed-dir relative to the checkout's root, run from elsewhere
    root = tmp_path / "checkout"
    (root / "runs" / "fed").mkdir(parents=True)
    ceiling = {
        "exact": {"acc": 0.7201, "auc": 0.7907, "severe_share": 0.47},
        "generated": {"n": 191, "auc": 0.827, "acc_bayes": 0.7644, "acc_best_threshold": 0.7644},
    }
    (root / "runs" / "fed" / "synth.json").write_text(json.dumps({"generator": "mdmt synth", "ceiling": ceiling}))
    store = root / "docs" / "results" / "demo" / "store.sqlite"
    small_store(store, "runs/fed", np.random.default_rng(0))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    st = RunStore(store, readonly=True)
    summary = report.write_report(st, tmp_path / "out", n_boot=N_BOOT)
    st.close()
    table = pd.read_csv(tmp_path / "out" / "ceiling.csv")
    assert table.to_dict("records")[0] == {
        "fed_dir": "runs/fed",
        "source": "generated",
        "n": 191,
        "oracle_acc": 0.7644,
        "oracle_auc": 0.827,
    }
    assert table["oracle_acc"].tolist() == [0.7644, 0.7201] and table["oracle_auc"].tolist() == [0.827, 0.7907]
    line = "Oracle ceiling (runs/fed, synth.json): ACC 76.4%, AUC 0.827 on the federation's 191 prognosis patients"
    rep = (tmp_path / "out" / "report.md").read_text()
    methods = rep.index("## leave-one-centre-out: mean over backbones")
    assert rep.index(line) > methods and rep.count(line) == 1 and line in summary
    assert "| runs/fed | generated | 191 | 76.4 | 0.827 |" in (tmp_path / "out" / "ceiling.md").read_text()
    # A store made in another checkout names an absolute fed-dir that is gone here: found by its last parts.
    moved = root / "docs" / "results" / "moved" / "store.sqlite"
    small_store(moved, str(tmp_path / "other-checkout" / "runs" / "fed"), np.random.default_rng(0))
    st = RunStore(moved, readonly=True)
    table, _ = report.oracle_ceilings(st, report.finished_units(st))
    st.close()
    assert table["oracle_auc"].tolist() == [0.827, 0.7907]
    # Run configs hold absolute paths: one inside the current folder is shown relative to it.
    absolute = root / "docs" / "results" / "absolute" / "store.sqlite"
    small_store(absolute, str(root / "runs" / "fed"), np.random.default_rng(0))
    monkeypatch.chdir(root)
    st = RunStore(absolute, readonly=True)
    table, lines = report.oracle_ceilings(st, report.finished_units(st))
    st.close()
    assert table["fed_dir"].tolist() == ["runs/fed", "runs/fed"]
    assert list(lines.values())[0].startswith("Oracle ceiling (runs/fed, synth.json): ACC 76.4%")


def test_no_ceiling_for_an_imported_or_missing_federation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real-fed").mkdir()  # an imported federation: no synth.json
    small_store(tmp_path / "a.sqlite", "real-fed", np.random.default_rng(1))
    st = RunStore(tmp_path / "a.sqlite", readonly=True)
    report.write_report(st, tmp_path / "out", n_boot=N_BOOT)
    table, lines = report.oracle_ceilings(st, report.finished_units(st))
    st.close()
    assert table.empty and list(lines.values()) == [
        "no oracle ceiling: not a synthetic federation (real-fed holds no synth.json)"
    ]
    assert (tmp_path / "out" / "report.md").read_text().count("no oracle ceiling: not a synthetic federation") == 1
    small_store(tmp_path / "b.sqlite", "gone/fed", np.random.default_rng(2))
    st = RunStore(tmp_path / "b.sqlite", readonly=True)
    table, lines = report.oracle_ceilings(st, report.finished_units(st))
    st.close()
    assert table.empty and list(lines) == ["gone/fed"] and "gone/fed not found" in lines["gone/fed"]
    assert "\n" not in lines["gone/fed"]


# ---- validation AUC per round ----------------------------------------------------------------------------------
def test_validation_auc_per_round_and_per_backbone(tmp_path):
    rng = np.random.default_rng(9)
    st = RunStore(tmp_path / "s.sqlite")
    val: dict = {}
    for backbone, sep in (("resnet18", 30), ("densenet121", 1)):
        for fold, train in (("A", ["B", "C"]), ("B", ["A", "C"])):
            key = UnitKey("mdmt", backbone, "loco", fold, 0)
            st.start_unit(key, train, {fold: "all"}, {"threshold": "0.5"}, {})
            for rnd in (1, 2, 3):
                hists = {s: score_hist(rng, 25, 25, sep * rnd / 3) for s in train}
                val[(backbone, fold, rnd)] = sum(hists.values())
                rows = [prog_stat(s, "val", h) for s, h in hists.items()]
                rows += [
                    prog_stat(fold, "all", score_hist(rng, 20, 20, sep)),
                    prog_stat(fold, "val", score_hist(rng, 9, 1, 0)),
                ]
                st.log_round(key, rnd, [("*", "prognosis", "val", "monitored_loss", 1.0 / rnd)], rows, [])
            st.finish_unit(key, "done", 2)
    report.write_report(st, tmp_path / "out", n_boot=N_BOOT, seed=0)
    st.close()
    curves = pd.read_csv(tmp_path / "out" / "learning_curves.csv", dtype={"fold": str})
    for (backbone, fold, rnd), h in val.items():
        row = curves[(curves.backbone == backbone) & (curves.fold == fold) & (curves["round"] == rnd)].iloc[0]
        assert row["val_auc"] == pytest.approx(expected(h, 100)["auc"]), (backbone, fold, rnd)  # roc_auc_score
        assert row["val_n"] == 100  # the held-out centre's own 'val' row is not a training site's
    table = pd.read_csv(tmp_path / "out" / "validation_loco.csv").set_index("backbone")
    for backbone in ("resnet18", "densenet121"):
        sel = [val[(backbone, f, 2)] for f in ("A", "B")]
        r = table.loc[backbone]
        assert r["n_units"] == 2 and r["method"] == "mdmt"
        assert r["val_auc_selected"] == pytest.approx(np.mean([expected(h, 100)["auc"] for h in sel]))
        assert r["val_auc_last"] == pytest.approx(np.mean([expected(val[(backbone, f, 3)], 100)["auc"] for f in "AB"]))
        above = sum(auc_ci(as_layout(h), n_boot=N_BOOT, seed=0)[0] > 0.5 for h in sel)
        assert r["n_above_chance"] == above
    assert table.loc["resnet18", "n_above_chance"] == 2 and table.loc["densenet121", "n_above_chance"] == 0
    png = (tmp_path / "out" / "learning_auc_loco.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    h = as_layout(val[("resnet18", "A", 1)])
    assert report.hist_aucs(np.stack([h, h[::-1]])) == pytest.approx([auc_from_hist(h), auc_from_hist(h[::-1])])


# ---- CV: pooled test sites, threshold from the training sites' validation ----------------------------------
def test_cv_pools_test_sites_at_the_validation_threshold(tmp_path):
    rng = np.random.default_rng(3)
    st = RunStore(tmp_path / "s.sqlite")
    val = np.zeros((2, HIST_BINS), int)
    val[0, 30:61] = 2  # MILD in bins 30..60, SEVERE in 61..90: Youden's J is 1 only at bin 61
    val[1, 61:91] = 2
    tests = {}
    for method in ("mdmt", "stl_prognosis"):
        for fold in ("0", "1"):
            key = UnitKey(method, "resnet18", "cv", fold, 0)
            st.start_unit(key, ["A", "B"], {"A": "val", "B": "val"}, {"threshold": "val"}, {})
            rows = []
            for site in ("A", "B"):
                rows.append(prog_stat(site, "val", val))
                tests[(method, fold, site)] = score_hist(rng, 30, 20, 25)
                rows.append(prog_stat(site, "test", tests[(method, fold, site)]))
            st.log_round(key, 1, [("*", "prognosis", "val", "monitored_loss", 0.5)], rows, [])
            st.finish_unit(key, "done", 1)
    report.write_report(st, tmp_path / "out", n_boot=N_BOOT)
    st.close()
    folds = pd.read_csv(tmp_path / "out" / "folds_cv.csv", dtype={"fold": str})
    row = folds[(folds.method == "mdmt") & (folds.fold == "1")].iloc[0]
    # the cut-off falls between the scores of fabricated bins 60 and 61, at the edge nearest 0.5
    assert 60.5 / HIST_BINS < row["threshold"] <= 61.5 / HIST_BINS
    assert row["threshold"] == pytest.approx(edge_p(as_layout(val).sum(axis=0).nonzero()[0][31]))
    exp = expected(tests[("mdmt", "1", "A")] + tests[("mdmt", "1", "B")], 61)
    assert row["acc"] == pytest.approx(exp["acc"]) and row["n"] == exp["n"]
    centres = pd.read_csv(tmp_path / "out" / "centres_cv.csv")
    a = centres[(centres.method == "stl_prognosis") & (centres.centre == "A")].iloc[0]
    assert a["acc"] == pytest.approx(
        expected(tests[("stl_prognosis", "0", "A")] + tests[("stl_prognosis", "1", "A")], 61)["acc"]
    )
    assert (tmp_path / "out" / "roc_cv.png").is_file() and not (tmp_path / "out" / "folds_loco.csv").exists()


# ---- files, plots, CLI -----------------------------------------------------------------------------------
def test_plots_and_learning_curves_written(loco_report):
    d, _, summary = loco_report
    for name in ("roc_loco.png", "centres_loco.png", "learning_loco.png", "learning_auc_loco.png"):
        data = (d / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert name in summary
    curves = pd.read_csv(d / "out" / "learning_curves.csv")
    u = curves[curves.unit_id == "mdmt/resnet18/loco/A/seed0"].sort_values("round")
    assert u["monitored_loss"].tolist() == [0.9, 0.6] and u["train_loss"].tolist() == [1.0, 0.7]
    assert "mdmt/resnet18/loco/A/seed1" not in set(curves.unit_id)
    assert "![roc_loco](roc_loco.png)" in (d / "out" / "report.md").read_text()


def test_empty_store_is_one_line_and_writes_nothing(tmp_path):
    RunStore(tmp_path / "s.sqlite").close()
    st = RunStore(tmp_path / "s.sqlite", readonly=True)
    msg = report.write_report(st, tmp_path / "out")
    st.close()
    assert "no finished unit" in msg and "\n" not in msg and not (tmp_path / "out").exists()


def test_bad_threshold_config_is_a_one_line_error(tmp_path):
    from mdmt.ops.cli import main

    st = RunStore(tmp_path / "s.sqlite")
    key = UnitKey("mdmt", "resnet18", "loco", "A", 0)
    st.start_unit(key, ["B"], {"A": "all"}, {"threshold": "high"}, {})
    st.log_round(key, 1, [], [prog_stat("A", "all", score_hist(np.random.default_rng(0), 5, 5, 10))], [])
    st.finish_unit(key, "done", 1)
    st.close()
    assert main(["report", "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out")]) == 2


def test_cli_report(tmp_path):
    build_loco_store(tmp_path / "store.sqlite", backbones=BACKBONES[:2], methods=("stl_prognosis", "mdmt"))
    st = RunStore(tmp_path / "store.sqlite", readonly=True)
    report.write_report(st, tmp_path / "out", n_boot=N_BOOT)
    st.close()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdmt.ops.cli",
            "report",
            "--store",
            str(tmp_path / "store.sqlite"),
            "--out",
            str(tmp_path / "rep"),
            "--bootstrap",
            "20",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "mean over backbones" in r.stdout and "tests.md" in r.stdout
    for name in (
        "methods_loco.csv",
        "methods_loco.md",
        "methods_loco.tex",
        "backbones_loco.csv",
        "centres_loco.csv",
        "folds_loco.csv",
        "tests.md",
        "severity.csv",
        "loco.csv",
        "loco.md",
        "report.md",
    ):
        assert (tmp_path / "rep" / name).is_file(), name
    # same numbers as the in-process report (bootstrap bounds aside)
    a = pd.read_csv(tmp_path / "rep" / "methods_loco.csv").drop(columns=["auc_lo", "auc_hi"])
    b = pd.read_csv(tmp_path / "out" / "methods_loco.csv").drop(columns=["auc_lo", "auc_hi"])
    pd.testing.assert_frame_equal(a, b)


def test_severity_only_store_without_curves(tmp_path):
    st = RunStore(tmp_path / "s.sqlite")
    key = UnitKey("stl_severity", "resnet18", "loco", "-", 0)
    st.start_unit(key, ["BRIXIA"], {}, {}, {})
    cm = severity_cm(np.random.default_rng(2))
    st.log_round(key, 1, [], [sev_stat("BRIXIA", "val", cm)], [])
    st.finish_unit(key, "done", 1)
    summary = report.write_report(st, tmp_path / "out", n_boot=N_BOOT)
    st.close()
    assert summary.startswith("No prognosis results") and "severity.csv" in summary
    sev = pd.read_csv(tmp_path / "out" / "severity.csv")
    assert sev["val_acc"].iloc[0] == pytest.approx(expected_multiclass(cm)[0]) and sev["test_n"].iloc[0] == 0
    assert not (tmp_path / "out" / "tests.csv").exists() and (tmp_path / "out" / "loco.csv").is_file()


def test_the_report_names_the_training_code_of_its_units():
    one = [{"recipe": json.dumps({"code": "abc"})}] * 3
    assert report.write.code_line(one) == "Training code: all 3 units came from training code abc."
    mixed = one + [{"recipe": json.dumps({"code": "def"})}, {"recipe": None}]
    line = report.write.code_line(mixed)
    assert "3 versions" in line and "abc (3 units)" in line and "def (1 units)" in line and "not recorded" in line

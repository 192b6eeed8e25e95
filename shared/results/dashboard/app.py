"""The Dash app: one layout, a poll of the stores' data version, and one callback that renders the page.

Data access is in mdmt.results.dashboard.data, figures in mdmt.results.dashboard.figures; this module only turns
their frames into HTML. Every asset is served by this process (serve_locally, no external CSS/JS/fonts).
"""

from __future__ import annotations

import logging
import math
import time
from urllib.parse import parse_qs, urlencode

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from mdmt.results.dashboard import data as D
from mdmt.results.dashboard import figures as F

log = logging.getLogger("mdmt.dashboard")

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif; margin: 0;
       color: #1d2330; background: #f6f7f9; font-size: 14px; }
header { display: flex; align-items: baseline; gap: 18px; padding: 10px 20px; background: #1d2330; color: #fff; }
header a { color: #cfe0ff; text-decoration: none; font-weight: 600; }
header a:hover { text-decoration: underline; }
header .brand { font-size: 17px; font-weight: 700; margin-right: 12px; }
header .live { margin-left: auto; font-size: 12px; color: #aab3c5; }
main { padding: 14px 20px 40px; max-width: 1500px; }
h2 { margin: 6px 0 8px; font-size: 20px; }
h3 { margin: 22px 0 6px; font-size: 16px; border-bottom: 1px solid #dde1e8; padding-bottom: 3px; }
table.grid { border-collapse: collapse; background: #fff; margin: 6px 0 10px; font-size: 13px; }
table.grid th, table.grid td { border: 1px solid #dde1e8; padding: 3px 8px; text-align: right; white-space: nowrap; }
table.grid th { background: #eef1f5; font-weight: 600; }
table.grid td.text, table.grid th.text { text-align: left; }
table.grid tr.summary td { background: #f3f6fb; font-weight: 600; }
.status { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.status-done { background: #d9f2e0; color: #17602d; }
.status-running { background: #fff1c7; color: #7a5600; }
.status-failed, .status-error { background: #fbd9d9; color: #8a1313; }
td.ok { color: #17602d; } td.bad { background: #fbe4e4; color: #8a1313; } td.none { color: #9aa2b1; }
.note { background: #fff; border-left: 4px solid #7a8ba8; padding: 8px 12px; margin: 8px 0; }
.note.warn { border-left-color: #d09a00; } .note.error { border-left-color: #c62828; }
.empty { background: #fff; padding: 30px; text-align: center; font-size: 16px; border: 1px dashed #c5cbd6; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 22px; margin: 4px 0 8px; }
.facts span b { color: #56607a; font-weight: 600; margin-right: 4px; }
.cms { display: flex; flex-wrap: wrap; gap: 16px; }
.cms .cm caption { font-weight: 600; text-align: left; padding-bottom: 2px; }
.rocs { display: flex; flex-wrap: wrap; gap: 10px; } .rocs .roc { flex: 1 1 440px; max-width: 560px; }
td.wrap { white-space: normal; min-width: 160px; }
details summary { cursor: pointer; color: #2a5db0; margin: 4px 0; }
"""

INDEX = (
    """<!DOCTYPE html>
<html lang="en">
<head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>"""
    + CSS
    + """</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body>
</html>"""
)


# ---- formatting ----------------------------------------------------------------------------------------
def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, str) and pd.isna(v))


def pct(v) -> str:
    """Percent with one decimal, as the LOCO report prints it."""
    return "-" if _nan(v) else f"{100 * float(v):.1f}"


def num3(v) -> str:
    return "-" if _nan(v) else f"{float(v):.3f}"


def num4(v) -> str:
    return "-" if _nan(v) else f"{float(v):.4f}"


def count(v) -> str:
    return "-" if _nan(v) else f"{int(v)}"


def _cell(v, cls: str | None = None):
    if isinstance(v, (html.Td,)):
        return v
    return html.Td(v, className=cls or ("text" if isinstance(v, str) and not _numeric_text(v) else None))


def _numeric_text(s: str) -> bool:
    try:
        float(s.split(" ")[0])
        return True
    except ValueError:
        return s == "-"


def grid(
    header: list[str],
    rows: list[list],
    table_id: str | None = None,
    row_ids: list[str] | None = None,
    row_classes: list[str | None] | None = None,
) -> html.Table:
    cells = [[_cell(c) for c in r] for r in rows]
    first = cells[0] if cells else []
    align = [
        ("text" if i >= len(first) or "text" in (getattr(first[i], "className", None) or "") else None)
        for i in range(len(header))
    ]
    head = html.Thead(html.Tr([html.Th(h, className=align[i]) for i, h in enumerate(header)]))
    body = []
    for i, r in enumerate(cells):
        kw = {}
        if row_ids:
            kw["id"] = row_ids[i]
        if row_classes and row_classes[i]:
            kw["className"] = row_classes[i]
        body.append(html.Tr(r, **kw))
    kw = {"id": table_id} if table_id else {}
    return html.Table([head, html.Tbody(body)], className="grid", **kw)


def status_badge(status: str) -> html.Span:
    key = (status or "").split(":")[0].strip().lower() or "unknown"
    return html.Span(status or "unknown", className=f"status status-{key}")


def note(text, kind: str = "") -> html.Div:
    return html.Div(text, className=f"note {kind}".strip())


def graph(fig, gid: str | None = None) -> dcc.Graph:
    kw = {"id": gid} if gid else {}
    return dcc.Graph(figure=fig, config={"displaylogo": False, "displayModeBar": False, "responsive": True}, **kw)


def run_href(store_index: int, unit_id: str) -> str:
    return "/run?" + urlencode({"store": store_index, "unit": unit_id})


def _slug(*parts) -> str:
    return "-".join(str(p) for p in parts).replace("/", "_").replace(" ", "_")


# ---- pages ---------------------------------------------------------------------------------------------
def page_runs(sources: list[D.Source]) -> list:
    runs, problems = D.list_runs(sources)
    out: list = [html.H2("Runs")]
    out += [note(p, "error") for p in problems]
    if not runs:
        out.append(
            html.Div(
                [
                    "No runs yet. ",
                    html.Br(),
                    "Start one (for example ",
                    html.Code("mdmt loco --fed FED --method mdmt"),
                    "); this page shows it as soon as its first unit starts.",
                ],
                className="empty",
                id="no-runs",
            )
        )
        return out
    multi = len(sources) > 1
    header = (["store"] if multi else []) + [
        "run (unit)",
        "method",
        "backbone",
        "protocol",
        "fold",
        "seed",
        "status",
        "rounds done",
        "selected round",
        "started",
        "ended",
        "train sites",
        "evaluated sites",
        "message",
    ]
    rows = []
    for u in runs:
        rounds = f"{u['rounds_done']}" + (f" of {u['num_rounds']}" if u.get("num_rounds") else "")
        evals = ", ".join(f"{s} ({sp})" for s, sp in u["eval_sites"].items())
        rows.append(
            ([u["store"]] if multi else [])
            + [
                html.Td(dcc.Link(u["unit_id"], href=run_href(u["store_index"], u["unit_id"])), className="text"),
                u["method"],
                u["backbone"],
                u["protocol"],
                u["fold"],
                str(u["seed"]),
                html.Td(status_badge(u["status"]), className="text"),
                rounds,
                "-" if u["best_round"] is None else str(u["best_round"]),
                D.fmt_time(u["started"]),
                D.fmt_time(u["ended"]),
                html.Td(", ".join(u["train_sites"]), className="text wrap"),
                html.Td(evals, className="text wrap"),
                html.Td(u.get("message") or "", className="text wrap"),
            ]
        )
    out.append(grid(header, rows, "runs-table", row_ids=[_slug("run", u["store_index"], u["unit_id"]) for u in runs]))
    n = {s: sum(u["status"] == s for u in runs) for s in ("running", "done", "failed")}
    out.append(
        html.P(
            f"{len(runs)} units: {n['done']} done, {n['running']} running, {n['failed']} failed. "
            f"Stores: {', '.join(str(s.path) for s in sources)}"
        )
    )
    return out


def _participation_cell(cell: dict) -> html.Td:
    parts, bad = [], False
    for kind, label in (("train", "train"), ("evaluate", "eval")):
        st = cell[kind]
        if st is None:
            continue
        if kind == "evaluate" and cell.get("split"):
            label = f"eval {cell['split']}"
        parts.append(f"{label} {st}")
        bad |= st != "ok"
    if not parts:
        return html.Td("-", className="none")
    return html.Td(" · ".join(parts), className="text bad" if bad else "text ok")


def page_run(sources: list[D.Source], search: str) -> list:
    q = parse_qs((search or "").lstrip("?"))
    unit_id = (q.get("unit") or [""])[0]
    try:
        store_index = int((q.get("store") or ["0"])[0])
    except ValueError:
        store_index = -1
    ud = D.load_unit(sources, store_index, unit_id) if unit_id else None
    if ud is None:
        return [
            html.H2("Run not found"),
            html.Div(
                [
                    "No unit ",
                    html.Code(unit_id or "(none given)"),
                    " in this store. ",
                    dcc.Link("Back to the runs", href="/"),
                ],
                className="empty",
            ),
        ]
    u = ud.info
    out: list = [html.H2(u["unit_id"], id="run-title")]
    facts = [
        ("status", status_badge(u["status"])),
        ("store", u["store"]),
        (
            "rounds done",
            html.Span(
                f"{u['rounds_done']}" + (f" of {u['num_rounds']}" if u.get("num_rounds") else ""), id="run-rounds"
            ),
        ),
        ("selected round", "-" if u["best_round"] is None else str(u["best_round"])),
        ("started", D.fmt_time(u["started"])),
        ("ended", D.fmt_time(u["ended"]) or "-"),
        ("train sites", ", ".join(u["train_sites"]) or "-"),
        ("evaluated", ", ".join(f"{s} ({sp})" for s, sp in u["eval_sites"].items()) or "-"),
    ]
    out.append(html.Div([html.Span([html.B(k), v]) for k, v in facts], className="facts"))
    if u["status"] == "running":
        out.append(note("In progress: this page updates by itself as rounds arrive.", "warn"))
    elif u["status"] == "failed":
        out.append(note(f"This unit failed: {u.get('message') or 'no message recorded'}", "error"))
    if not ud.rounds:
        out.append(html.Div("No round has finished yet.", className="empty"))
        return out

    colours = F.site_colours([*u["train_sites"], *u["eval_sites"], *ud.participation.get("site", [])])
    gm = D.global_metrics(ud)
    out.append(html.H3("Global metrics per round"))
    out.append(
        html.P(
            "Prognosis pooled over the sites evaluated on each split (summed score histograms cut at the "
            "round's decision threshold), severity on the summed confusion matrices. % except AUC."
        )
    )
    rows = [
        [
            str(int(r["round"])),
            r["split"],
            r["sites"],
            num3(r["threshold"]),
            count(r["prog_n"]),
            pct(r["prog_acc"]),
            pct(r["prog_f1"]),
            pct(r["prog_gmean"]),
            num3(r["prog_auc"]),
            count(r["sev_n"]),
            pct(r["sev_acc"]),
            pct(r["sev_f1"]),
        ]
        for _, r in gm.iterrows()
    ]
    out.append(
        grid(
            [
                "round",
                "split",
                "sites",
                "threshold",
                "prognosis n",
                "ACC",
                "F1",
                "G-mean",
                "AUC",
                "severity n",
                "sev. accuracy",
                "sev. F1",
            ],
            rows,
            "global-table",
            row_ids=[_slug("global", int(r["round"]), r["split"]) for _, r in gm.iterrows()],
        )
    )
    out.append(graph(F.global_figure(gm), "global-graph"))

    sm = D.site_metrics(ud)
    out.append(html.H3("Per site and task"))
    names = [c for c in ("n", "acc", "f1", "gmean", "auc", "sensitivity", "specificity", "loss") if c in sm]
    fmt = {"n": count, "auc": num3, "loss": num4}

    def site_rows(df: pd.DataFrame) -> list[list]:
        return [
            [str(int(r["round"])), r["site"], r["task"], r["split"], *[fmt.get(c, pct)(r[c]) for c in names]]
            for _, r in df.iterrows()
        ]

    head = ["round", "site", "task", "split", *names]
    last = max(ud.rounds)
    show = {last} | ({u["best_round"]} if u["best_round"] else set())
    out.append(grid(head, site_rows(sm[sm["round"].isin(show)].sort_values(["round", "site", "task"])), "site-table"))
    out.append(
        html.Details(
            [
                html.Summary(f"every round ({len(sm)} rows)"),
                grid(head, site_rows(sm.sort_values(["site", "task", "round"]))),
            ]
        )
    )
    out.append(graph(F.site_metrics_figure(sm, colours), "site-graph"))

    out.append(html.H3("Losses"))
    out.append(graph(F.loss_figure(D.loss_curves(ud), colours), "loss-graph"))

    out.append(html.H3("Participation"))
    sites, prow = D.participation_grid(ud)
    if prow:
        out.append(
            grid(
                ["round", *sites],
                [[str(r["round"]), *[_participation_cell(r["cells"][s]) for s in sites]] for r in prow],
                "participation",
                row_ids=[f"participation-{r['round']}" for r in prow],
            )
        )
    else:
        out.append(note("No participation recorded yet."))

    out.append(html.H3("Bytes sent per round"))
    b = D.named_per_site(ud, ("bytes_down", "bytes_up"))
    if b.empty:
        out.append(note("Bytes not recorded for this run (the store has no bytes_down/bytes_up rows).", ""))
    else:
        tot = b.pivot_table(index="round", columns="name", values="value", aggfunc="sum").reset_index()
        out.append(
            grid(
                ["round", "sent to sites (MB)", "returned by sites (MB)"],
                [
                    [
                        str(int(r["round"])),
                        f"{r.get('bytes_down', float('nan')) / 1e6:.1f}",
                        f"{r.get('bytes_up', float('nan')) / 1e6:.1f}",
                    ]
                    for _, r in tot.iterrows()
                ],
                "bytes-table",
            )
        )
        out.append(graph(F.bytes_figure(b, colours), "bytes-graph"))

    out.append(html.H3("Differential privacy"))
    e = D.named_per_site(ud, ("epsilon",))
    if e.empty:
        out.append(note("DP off: no epsilon recorded for this run.", ""))
    else:
        wide = e.pivot_table(index="round", columns="site", values="value", aggfunc="first").reset_index()
        cols = [c for c in wide.columns if c != "round"]
        out.append(
            grid(
                ["round", *[f"epsilon {c}" for c in cols]],
                [[str(int(r["round"])), *[num3(r[c]) for c in cols]] for _, r in wide.iterrows()],
                "epsilon-table",
            )
        )
        out.append(graph(F.epsilon_figure(e, colours), "epsilon-graph"))
    return out


LOCO_HEAD = [
    "method",
    "backbone",
    "seed",
    "centre",
    "round",
    "threshold",
    "n",
    "ACC",
    "F1 (weighted)",
    "G-mean",
    "G-mean (weighted)",
    "AUC [95% CI]",
    "sens",
    "spec",
]


def _auc_ci(r) -> str:
    s = num3(r.get("auc"))
    if not _nan(r.get("auc_lo")):
        s += f" [{num3(r['auc_lo'])}, {num3(r['auc_hi'])}]"
    return s


def _pending_notes(runs: list[dict]) -> list:
    pend = D.loco_pending(runs)
    if not pend:
        return []
    items = [
        html.Li(
            [
                dcc.Link(u["unit_id"], href=run_href(u["store_index"], u["unit_id"])),
                " ",
                status_badge(u["status"]),
                f" round {u['rounds_done']}",
                f": {u['message']}" if u.get("message") else "",
            ]
        )
        for u in pend
    ]
    return [note([f"{len(pend)} LOCO unit(s) not in the table yet (running, or failed):", html.Ul(items)], "warn")]


def page_loco(sources: list[D.Source], version: str) -> list:
    runs, problems = D.list_runs(sources)
    table, p2 = D.loco_frame(sources, version)
    out: list = [html.H2("Leave-one-centre-out")]
    out += [note(p, "error") for p in problems + p2]
    out += _pending_notes(runs)
    if table.empty:
        out.append(
            html.Div(
                "No finished LOCO unit yet: the table appears when the first held-out centre is done.",
                className="empty",
                id="no-loco",
            )
        )
        return out
    multi = len(sources) > 1
    out.append(
        html.P(
            "Prognosis on each held-out centre at its unit's selected round; 'mean' averages the centres, "
            "'pooled' scores the held-out centres together. % except AUC and threshold."
        )
    )
    rows, ids, classes = [], [], []
    for _, r in table.iterrows():
        rows.append(
            ([r["store"]] if multi else [])
            + [
                r["method"],
                r["backbone"],
                str(int(r["seed"])),
                r["centre"],
                "" if _nan(r["round"]) else str(int(r["round"])),
                num3(r.get("threshold")),
                count(r["n"]),
                pct(r["acc"]),
                pct(r["f1"]),
                pct(r["gmean"]),
                pct(r.get("gmean_weighted")),
                _auc_ci(r),
                pct(r.get("sensitivity")),
                pct(r.get("specificity")),
            ]
        )
        ids.append(_slug("loco", r["store"], r["method"], r["backbone"], int(r["seed"]), r["centre"]))
        classes.append("summary" if r["centre"] in ("mean", "pooled") else None)
    out.append(grid((["store"] if multi else []) + LOCO_HEAD, rows, "loco-table", ids, classes))

    curves = D.loco_curves(sources, table)
    out.append(html.H3("ROC curves (held-out centres at the selected round)"))
    groups: dict[tuple, list[dict]] = {}
    for c in curves:
        groups.setdefault((c["store"], c["backbone"], c["seed"], c["method"]), []).append(c)
    colours = F.site_colours(c["centre"] for c in curves if c["centre"] != "pooled")
    figs = []
    for (store, backbone, seed, method), cs in sorted(groups.items()):
        title = f"{method} · {backbone} · seed {seed}" + (f" ({store})" if multi else "")
        figs.append(
            html.Div(
                graph(F.roc_figure(cs, title, colours), _slug("roc", store, method, backbone, seed)), className="roc"
            )
        )
    out.append(html.Div(figs, className="rocs"))
    out.append(html.H3("Confusion matrices at the decision threshold"))
    cms = []
    for c in curves:
        cm = c["cm"]
        cap = f"{c['method']} / {c['backbone']} / {c['centre']}" + (
            f" (round {c['round']}, threshold {c['threshold']:.3f})" if c["round"] is not None else " (pooled)"
        )
        cms.append(
            html.Table(
                [
                    html.Caption(cap),
                    html.Thead(
                        html.Tr([html.Th("true \\ predicted", className="text"), html.Th("MILD"), html.Th("SEVERE")])
                    ),
                    html.Tbody(
                        [
                            html.Tr(
                                [html.Th("MILD", className="text"), html.Td(str(cm[0][0])), html.Td(str(cm[0][1]))]
                            ),
                            html.Tr(
                                [html.Th("SEVERE", className="text"), html.Td(str(cm[1][0])), html.Td(str(cm[1][1]))]
                            ),
                        ]
                    ),
                ],
                className="grid cm",
                id=_slug("cm", c["store"], c["method"], c["backbone"], c["seed"], c["centre"]),
            )
        )
    out.append(html.Div(cms, className="cms"))
    return out


def page_compare(sources: list[D.Source], version: str) -> list:
    runs, problems = D.list_runs(sources)
    table, p2 = D.loco_frame(sources, version)
    out: list = [html.H2("Comparison")]
    out += [note(p, "error") for p in problems + p2]
    out += paper_section(sources, version)
    cmp = D.comparison(table)
    if cmp.empty:
        out += _pending_notes(runs)
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
                ci = "" if _nan(r["pooled_auc_lo"]) else f" [{num3(r['pooled_auc_lo'])}, {num3(r['pooled_auc_hi'])}]"
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
        ci = "" if _nan(r["pooled_auc_lo"]) else f" [{num3(r['pooled_auc_lo'])}, {num3(r['pooled_auc_hi'])}]"
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
        ci = "" if _nan(r["auc_lo"]) else f" [{num3(r['auc_lo'])}, {num3(r['auc_hi'])}]"
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
    out.append(html.H3("Paired tests across backbones (one-tailed t-test and Wilcoxon)"))
    head = (["store"] if multi else []) + [
        "protocol",
        "comparison",
        "metric",
        "on",
        "H1",
        "n",
        "t-test p",
        "Wilcoxon p",
        "note",
    ]
    rows = []
    for _, r in tests.iterrows():
        h1 = {"greater": "A > B", "less": "A < B"}.get(r["alternative"], "-")
        tp = "-" if _nan(r["t_p"]) else f"{r['t_p']:.3f}{r['t_stars']}"
        wp = "-" if _nan(r["w_p"]) else f"{r['w_p']:.3f}{r['w_stars']}"
        rows.append(
            ([r["store"]] if multi else [])
            + [
                r["protocol"],
                r["comparison"],
                str(r["metric"]),
                str(r["summary"]),
                h1,
                str(int(r["n"])),
                tp,
                wp,
                r["note"] or "",
            ]
        )
    out.append(grid(head, rows, "tests-table"))
    return out


def render(sources: list[D.Source], pathname: str, search: str, version: str) -> list:
    if pathname in ("/", "/runs", "", None):
        return page_runs(sources)
    if pathname == "/run":
        return page_run(sources, search)
    if pathname == "/loco":
        return page_loco(sources, version)
    if pathname in ("/compare", "/comparison"):
        return page_compare(sources, version)
    return [
        html.H2("Page not found"),
        html.Div(["No page ", html.Code(pathname), ". ", dcc.Link("Runs", href="/")], className="empty"),
    ]


# ---- the app -------------------------------------------------------------------------------------------
def create_app(sources: list[D.Source], refresh_s: float = 2.0) -> dash.Dash:
    app = dash.Dash(
        __name__,
        serve_locally=True,
        external_stylesheets=[],
        external_scripts=[],
        include_assets_files=False,
        title="MDMT dashboard",
        update_title=None,
        suppress_callback_exceptions=True,
        compress=False,
    )
    app.index_string = INDEX

    def layout():
        return html.Div(
            [
                dcc.Location(id="url", refresh=False),
                dcc.Interval(id="tick", interval=int(refresh_s * 1000)),
                dcc.Store(id="version", data=D.data_version(sources)),
                html.Header(
                    [
                        html.Span("MDMT dashboard", className="brand"),
                        dcc.Link("Runs", href="/"),
                        dcc.Link("LOCO", href="/loco"),
                        dcc.Link("Comparison", href="/compare"),
                        html.Span(id="live", className="live"),
                    ]
                ),
                html.Main(id="page"),
            ]
        )

    app.layout = layout

    @app.callback(Output("version", "data"), Input("tick", "n_intervals"), State("version", "data"))
    def poll(_n, current):
        v = D.data_version(sources)
        if v == current:
            raise PreventUpdate
        return v

    @app.callback(
        Output("page", "children"),
        Output("live", "children"),
        Input("url", "pathname"),
        Input("url", "search"),
        Input("version", "data"),
    )
    def show(pathname, search, version):
        stamp = f"data as of {time.strftime('%H:%M:%S')} · checks every {refresh_s:g} s"
        try:
            return render(sources, pathname, search, version or ""), stamp
        except Exception as exc:  # a page must never turn into a traceback
            log.exception("rendering %s%s", pathname, search or "")
            msg = str(exc).splitlines()[0] if str(exc) else ""
            return [note(f"This page could not be rendered: {type(exc).__name__}: {msg}", "error")], stamp

    return app

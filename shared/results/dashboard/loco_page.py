"""The leave-one-centre-out page: the held-out centres' table, ROC curves and confusion matrices, and the
note listing LOCO units not in the table yet."""

from __future__ import annotations

from dash import dcc, html

from mdmt.results.dashboard import data as D
from mdmt.results.dashboard import figures as F
from mdmt.results.dashboard.layout import count, graph, grid, is_nan, note, num3, pct, run_href, slug, status_badge

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
    if not is_nan(r.get("auc_lo")):
        s += f" [{num3(r['auc_lo'])}, {num3(r['auc_hi'])}]"
    return s


def pending_notes(runs: list[dict]) -> list:
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
    out += pending_notes(runs)
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
                "" if is_nan(r["round"]) else str(int(r["round"])),
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
        ids.append(slug("loco", r["store"], r["method"], r["backbone"], int(r["seed"]), r["centre"]))
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
                graph(F.roc_figure(cs, title, colours), slug("roc", store, method, backbone, seed)), className="roc"
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
                id=slug("cm", c["store"], c["method"], c["backbone"], c["seed"], c["centre"]),
            )
        )
    out.append(html.Div(cms, className="cms"))
    return out

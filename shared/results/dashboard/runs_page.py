"""The runs page (every unit in the stores) and the page of one run (its metrics, losses, participation,
bytes and privacy budget per round)."""

from __future__ import annotations

from urllib.parse import parse_qs

import pandas as pd
from dash import dcc, html

from mdmt.results.dashboard import data as D
from mdmt.results.dashboard import figures as F
from mdmt.results.dashboard.layout import count, graph, grid, note, num3, num4, pct, run_href, slug, status_badge


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
    out.append(grid(header, rows, "runs-table", row_ids=[slug("run", u["store_index"], u["unit_id"]) for u in runs]))
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
            row_ids=[slug("global", int(r["round"]), r["split"]) for _, r in gm.iterrows()],
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

"""The page shell (stylesheet, HTML index, header with the navigation links) and the components every page uses:
number formatting as the reports print it, tables, status badges, notes, graphs and links to a run.

Every style is inline in the index page; the app loads no external CSS, JS or fonts.
"""

from __future__ import annotations

import math
from urllib.parse import urlencode

import pandas as pd
from dash import dcc, html

from mdmt.results.dashboard import data as D

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
def is_nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, str) and pd.isna(v))


def pct(v) -> str:
    """Percent with one decimal, as the LOCO report prints it."""
    return "-" if is_nan(v) else f"{100 * float(v):.1f}"


def num3(v) -> str:
    return "-" if is_nan(v) else f"{float(v):.3f}"


def num4(v) -> str:
    return "-" if is_nan(v) else f"{float(v):.4f}"


def count(v) -> str:
    return "-" if is_nan(v) else f"{int(v)}"


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


def slug(*parts) -> str:
    return "-".join(str(p) for p in parts).replace("/", "_").replace(" ", "_")


def shell(sources: list[D.Source], refresh_s: float) -> html.Div:
    """The layout around every page: the URL, the refresh timer, the stores' data version, the header and an
    empty ``page`` for the render callback to fill."""
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

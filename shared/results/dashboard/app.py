"""The Dash app: one layout, a poll of the stores' data version, and one callback that renders the page.

Data access is in mdmt.results.dashboard.data, figures in mdmt.results.dashboard.figures, the shell and shared
components in mdmt.results.dashboard.layout, and each page's builder in its own module (runs_page, loco_page,
compare_page). Every asset is served by this process (serve_locally, no external CSS/JS/fonts).
"""

from __future__ import annotations

import logging
import time

import dash
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from mdmt.results.dashboard import data as D
from mdmt.results.dashboard.compare_page import page_compare
from mdmt.results.dashboard.layout import INDEX, note, shell
from mdmt.results.dashboard.loco_page import page_loco
from mdmt.results.dashboard.runs_page import page_run, page_runs

log = logging.getLogger("mdmt.dashboard")


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
        return shell(sources, refresh_s)

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

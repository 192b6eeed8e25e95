"""The ``dashboard`` verb: its arguments, the checks before start-up, and the server loop.

Nothing here imports Dash at module level, so the main CLI can register the verb without the extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from mdmt.errors import DataError, MDMTError
from mdmt.fed.config import RunConfig
from mdmt.results.dashboard.access import DEFAULT_HOST, TOKEN_ENV, AccessGate, check_bind
from mdmt.results.dashboard.data import resolve_sources

DEFAULTS = RunConfig()

DEFAULT_PORT = 8050


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--store",
        action="append",
        metavar="PATH",
        help="a run store file, or a workspace folder holding store.sqlite; repeat for several "
        "(default: <workspace>/store.sqlite)",
    )
    p.add_argument(
        "--workspace", default=DEFAULTS.workspace, help=f"used when --store is not given (default {DEFAULTS.workspace})"
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}); any other needs an access token",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument(
        "--token",
        default=None,
        help=f"access token required on every request (default: ${TOKEN_ENV}; prefer the variable, "
        "a command line is visible to other users)",
    )
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between checks for new data (default 2)")
    return p


def serve(
    stores: list[str | Path],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    refresh_s: float = 2.0,
    echo: Callable[[str], None] = print,
) -> None:
    """Check the bind and the stores, then serve until interrupted (SIGINT or SIGTERM).

    Raises MDMTError (one line) for a non-loopback bind without a token, a missing store, a missing Dash
    or a port in use."""
    token = token if token else (os.environ.get(TOKEN_ENV) or None)
    check_bind(host, token)
    if refresh_s <= 0:
        raise MDMTError(f"--refresh {refresh_s}: give a positive number of seconds")
    for s in stores:  # before the slow imports: a missing store is a quick one-line error
        path = Path(s).expanduser()
        if not (path / "store.sqlite" if path.is_dir() else path).is_file():
            raise DataError(
                f"{path / 'store.sqlite' if path.is_dir() else path}: run store not found; "
                "run an experiment first or pass --store PATH"
            )

    sources = resolve_sources([str(s) for s in stores])
    try:
        # deferred: dash and werkzeug (the dashboard extra) load only when it serves
        from werkzeug.serving import make_server

        # deferred: dash and werkzeug (the dashboard extra) load only when it serves
        from mdmt.results.dashboard.app import create_app
    except ImportError as exc:
        raise MDMTError(f"the dashboard needs Dash ({exc.name} is missing): pip install -e '.[dashboard]'") from None
    app = create_app(sources, refresh_s)
    app.server.wsgi_app = AccessGate(app.server.wsgi_app, token)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request (the page polls)
    try:
        server = make_server(host, port, app.server, threaded=True)
    except OSError as exc:
        raise MDMTError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/"
    stores_txt = ", ".join(str(s.path) for s in sources)
    echo(
        f"mdmt dashboard: serving {url} for {stores_txt}"
        + (" (access token required: open it once with ?token=<token>)" if token else "")
        + "; Ctrl-C stops it"
    )

    def _stop(_sig, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def run(a: argparse.Namespace) -> None:
    """What ``mdmt dashboard`` calls with the arguments of :func:`add_arguments`."""
    stores = a.store or [Path(a.workspace) / "store.sqlite"]
    serve(
        stores, host=a.host, port=a.port, token=a.token, refresh_s=a.refresh, echo=lambda line: print(line, flush=True)
    )


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(
        argparse.ArgumentParser(prog="mdmt dashboard", description="serve a web dashboard over run stores")
    )
    a = p.parse_args(argv)
    try:
        run(a)
    except MDMTError as exc:
        print(f"mdmt dashboard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

"""The ``dashboard`` verb: its arguments, the checks before start-up, and the server loop.

Nothing here imports Dash at module level, so the main CLI can register the verb without the extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

from mdmt.errors import DataError, MDMTError
from mdmt.fed.config import RunConfig
from mdmt.results.dashboard.access import (
    DEFAULT_HOST,
    DEFAULT_SESSION_HOURS,
    TOKEN_ENV,
    AccessGate,
    check_bind,
    check_session_hours,
)

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
    p.add_argument(
        "--session-hours",
        type=float,
        default=DEFAULT_SESSION_HOURS,
        metavar="H",
        help=f"with a token: how long a login (its session cookie) lasts (default {DEFAULT_SESSION_HOURS:g})",
    )
    p.add_argument("--certfile", default=None, metavar="PEM", help="serve HTTPS with this certificate (and --keyfile)")
    p.add_argument("--keyfile", default=None, metavar="PEM", help="the certificate's unencrypted private key")
    p.add_argument(
        "--behind-tls-proxy",
        action="store_true",
        help="a reverse proxy in front serves it over HTTPS: mark the session cookie Secure",
    )
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between checks for new data (default 2)")
    return p


class LazyHandshakeContext(ssl.SSLContext):
    """A server TLS context whose connections do their handshake on the first read, in the request's thread.

    werkzeug wraps its listening socket with the context. By default each accepted connection would do its
    handshake inside accept(), in the one thread that accepts them all, so a single client that connects
    and sends nothing would hold up every other."""

    def wrap_socket(
        self, sock, server_side=False, do_handshake_on_connect=True, suppress_ragged_eofs=True, **kwargs
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            **kwargs,
        )


def tls_context(certfile: str | Path | None, keyfile: str | Path | None) -> ssl.SSLContext | None:
    """The server's TLS context (TLS 1.2 or later) for --certfile/--keyfile, or None for plain HTTP.

    Raises MDMTError (one line naming the flag and file) for one of the two alone, a file missing or
    unreadable, a file that is not PEM, an encrypted key, or a key that does not match the certificate."""
    certfile, keyfile = certfile or None, keyfile or None
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        given, other = ("--certfile", "--keyfile") if certfile else ("--keyfile", "--certfile")
        raise MDMTError(f"{given} needs {other}: give both to serve HTTPS, or neither for plain HTTP")
    for flag, name in (("--certfile", certfile), ("--keyfile", keyfile)):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MDMTError(f"{flag} {name}: no such file")
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise MDMTError(f"{flag} {name}: cannot read it ({exc.strerror or exc})") from None
        if flag == "--certfile" and "-----BEGIN CERTIFICATE-----" not in text:
            raise MDMTError(f"{flag} {name}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
        if flag == "--keyfile" and "ENCRYPTED" in text:
            raise MDMTError(f"{flag} {name}: the key is encrypted; give it unencrypted, readable only by this user")
        if flag == "--keyfile" and "PRIVATE KEY-----" not in text:
            raise MDMTError(f"{flag} {name}: not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)")
    context = LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(Path(certfile).expanduser(), Path(keyfile).expanduser(), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise MDMTError(
            f"--certfile {certfile} / --keyfile {keyfile}: cannot use them ({reason}); the key must be the "
            "certificate's private key"
        ) from None
    return context


def serve(
    stores: list[str | Path],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    refresh_s: float = 2.0,
    echo: Callable[[str], None] = print,
    session_hours: float = DEFAULT_SESSION_HOURS,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    behind_tls_proxy: bool = False,
) -> None:
    """Check the bind, the TLS files and the stores, then serve until interrupted (SIGINT or SIGTERM).

    Raises MDMTError (one line) for a non-loopback bind without a token, a bad --session-hours, a TLS file
    missing or unusable, a missing store, a missing Dash or a port in use."""
    token = token if token else (os.environ.get(TOKEN_ENV) or None)
    check_bind(host, token)
    if not refresh_s > 0:
        raise MDMTError(f"--refresh {refresh_s}: give a positive number of seconds")
    check_session_hours(session_hours)
    context = tls_context(certfile, keyfile)
    for s in stores:  # before the slow imports: a missing store is a quick one-line error
        path = Path(s).expanduser()
        if not (path / "store.sqlite" if path.is_dir() else path).is_file():
            raise DataError(
                f"{path / 'store.sqlite' if path.is_dir() else path}: run store not found; "
                "run an experiment first or pass --store PATH"
            )

    # deferred: pandas and scikit-learn (mdmt.results.dashboard.data); building the parser needs neither
    from mdmt.results.dashboard.data import resolve_sources

    sources = resolve_sources([str(s) for s in stores])
    try:
        # deferred: dash and werkzeug (the dashboard extra) load only when it serves
        from werkzeug.serving import make_server

        # deferred: dash and werkzeug (the dashboard extra) load only when it serves
        from mdmt.results.dashboard.app import create_app
    except ImportError as exc:
        raise MDMTError(f"the dashboard needs Dash ({exc.name} is missing): pip install -e '.[dashboard]'") from None
    app = create_app(sources, refresh_s)
    secure = context is not None or behind_tls_proxy
    app.server.wsgi_app = AccessGate(app.server.wsgi_app, token, session_hours=session_hours, secure=secure)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request (the page polls)
    try:
        server = make_server(host, port, app.server, threaded=True, ssl_context=context)
    except OSError as exc:
        raise MDMTError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if context else 'http'}://{shown}:{server.server_port}/"
    stores_txt = ", ".join(str(s.path) for s in sources)
    login = f"open it with ?token=<token> to log in; a login lasts {session_hours:g} hours"
    echo(
        f"mdmt dashboard: serving {url} for {stores_txt}"
        + (f" (access token required: {login})" if token else "")
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
        stores,
        host=a.host,
        port=a.port,
        token=a.token,
        refresh_s=a.refresh,
        echo=lambda line: print(line, flush=True),
        session_hours=a.session_hours,
        certfile=a.certfile,
        keyfile=a.keyfile,
        behind_tls_proxy=a.behind_tls_proxy,
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

"""Who may read the dashboard: the bind rule and the token gate (a WSGI middleware; no Dash here).

- The default bind is 127.0.0.1. Any other host needs an access token, or the server refuses to start.
- With a token, every request must carry it: ``?token=...`` once (answered with a cookie and a redirect
  to the same address without the token), then the cookie; or a header ``Authorization: Bearer ...``
  / ``X-MDMT-Token: ...`` for scripts.
- Without a token (loopback only), requests whose Host header is not a loopback name are refused, so a
  web page elsewhere cannot reach the dashboard through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from mdmt.errors import MDMTError

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_ENV = "MDMT_DASHBOARD_TOKEN"
COOKIE = "mdmt_dashboard"
MIN_TOKEN_LENGTH = 16


def check_bind(host: str, token: str | None) -> None:
    """Refuse, in one line, a bind beyond the loopback defaults without a token (and a token too short)."""
    if token is not None and token != "" and len(token) < MIN_TOKEN_LENGTH:
        raise MDMTError(
            f"the access token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    if host not in LOOPBACK_NAMES and not token:
        raise MDMTError(
            f"--host {host} serves beyond this machine's loopback; give an access token (--token or "
            f"{TOKEN_ENV}), or keep the default {DEFAULT_HOST} behind a reverse proxy with its own "
            "authentication (nginx with basic auth: docs/dashboard.md)"
        )


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"mdmt-dashboard-cookie", hashlib.sha256).hexdigest()


def _host_name(host_header: str) -> str:
    host = host_header.strip()
    if host.startswith("["):  # [::1]:8050
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AccessGate:
    """WSGI middleware in front of the Dash/Flask app."""

    def __init__(self, app: Callable, token: str | None):
        self.app = app
        self.token = token or None
        self.cookie = _cookie_value(token) if token else ""

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not self.token:
            if not is_loopback_name(_host_name(environ.get("HTTP_HOST", ""))):
                return _deny(start_response, "403 Forbidden", "this dashboard answers loopback addresses only")
            return self.app(environ, start_response)
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given:
            if not hmac.compare_digest(given[-1].encode(), self.token.encode()):
                return _deny(start_response, "403 Forbidden", "wrong access token")
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/") + (f"?{rest}" if rest else "")
            start_response(
                "302 Found",
                [
                    ("Location", location),
                    ("Content-Length", "0"),
                    ("Cache-Control", "no-store"),
                    ("Set-Cookie", f"{COOKIE}={self.cookie}; Path=/; HttpOnly; SameSite=Strict"),
                ],
            )
            return [b""]
        auth = environ.get("HTTP_AUTHORIZATION", "")
        header = auth[7:].strip() if auth.lower().startswith("bearer ") else environ.get("HTTP_X_MDMT_TOKEN", "")
        if header:
            if hmac.compare_digest(header.encode(), self.token.encode()):
                return self.app(environ, start_response)
            return _deny(start_response, "403 Forbidden", "wrong access token")
        jar = SimpleCookie()
        try:
            jar.load(environ.get("HTTP_COOKIE", ""))
        except Exception:  # a malformed Cookie header is simply no cookie
            jar = SimpleCookie()
        if COOKIE in jar and hmac.compare_digest(jar[COOKIE].value.encode(), self.cookie.encode()):
            return self.app(environ, start_response)
        return _deny(
            start_response,
            "401 Unauthorized",
            "access token required: open this address once with ?token=<token> "
            "(or send 'Authorization: Bearer <token>')",
        )


def _deny(start_response: Callable, status: str, message: str) -> list[bytes]:
    body = f"mdmt dashboard: {message}\n".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]
    if status.startswith("401"):
        headers.append(("WWW-Authenticate", 'Bearer realm="mdmt dashboard"'))
    start_response(status, headers)
    return [body]

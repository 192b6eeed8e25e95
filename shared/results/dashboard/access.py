"""Who may read the dashboard: the bind rule, the token gate (a WSGI middleware; no Dash here) and its sessions.

- The default bind is 127.0.0.1. Any other host needs an access token, or the server refuses to start.
- With a token, every request must carry it or a session: ``?token=...`` once logs in (answered with a
  random session cookie and a redirect to the same path on this origin, without the token), then the
  cookie until its session expires; or a header ``Authorization: Bearer ...`` / ``X-MDMT-Token: ...`` on
  every request, for scripts. Sessions live in this process's memory only: a restart ends them all.
- Without a token (loopback only), requests whose Host header is not a loopback name are refused, so a
  web page elsewhere cannot reach the dashboard through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, quote, urlencode

from mdmt.errors import MDMTError

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_ENV = "MDMT_DASHBOARD_TOKEN"
COOKIE = "mdmt_dashboard"
MIN_TOKEN_LENGTH = 16
DEFAULT_SESSION_HOURS = 12.0
MAX_SESSION_HOURS = 24 * 366
SESSION_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 random bits
MAX_SESSIONS = 10_000  # beyond this many live sessions, a login ends the oldest one
LOGIN_HINT = "open this address with ?token=<token> to log in (or send 'Authorization: Bearer <token>')"


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


def check_session_hours(hours: float) -> None:
    """Refuse, in one line, a session lifetime that is not a positive number of hours up to a year."""
    if not 0 < hours <= MAX_SESSION_HOURS:  # also refuses nan
        raise MDMTError(f"--session-hours {hours:g}: give a number of hours above 0 and at most {MAX_SESSION_HOURS}")


def same_origin_path(environ: dict) -> str:
    """The request's path, percent-encoded, as a redirect target that stays on this origin; else ``/``.

    Only a path that starts with a single ``/`` passes: ``//host``, ``/\\host`` (which browsers read as
    ``//host``), a backslash or a control character anywhere, or a path that does not start with ``/``
    gives ``/``. The path is encoded again after the server decoded it, so ``/%2F%2Fhost`` cannot become
    ``//host`` in the Location header."""
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not path.startswith("/") or path[1:2] in ("/", "\\") or "\\" in path:
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "/"
    try:
        raw = path.encode("latin-1")  # PEP 3333: PATH_INFO carries the request's bytes as latin-1
    except UnicodeEncodeError:
        return "/"
    return quote(raw, safe="/!$&'()*+,;=:@-._~")


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


class Sessions:
    """Session ids issued at login, each with its expiry, in this process's memory (thread-safe).

    Only a SHA-256 of each id is kept, so the table itself holds nothing a browser could present. A
    session lasts ``lifetime_s`` from its login; it is not extended by use."""

    def __init__(self, lifetime_s: float, clock: Callable[[], float] = time.monotonic, limit: int = MAX_SESSIONS):
        self.lifetime_s = lifetime_s
        self.clock = clock
        self.limit = limit
        self._expiry: dict[bytes, float] = {}  # sha256(id) -> clock() at which it expires, oldest first
        self._lock = threading.Lock()

    @staticmethod
    def _key(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).digest()

    def issue(self) -> str:
        session_id = secrets.token_urlsafe(SESSION_BYTES)
        now = self.clock()
        with self._lock:
            for key in [k for k, t in self._expiry.items() if t <= now]:
                del self._expiry[key]
            while len(self._expiry) >= self.limit:
                del self._expiry[next(iter(self._expiry))]
            self._expiry[self._key(session_id)] = now + self.lifetime_s
        return session_id

    def valid(self, session_id: str) -> bool:
        key = self._key(session_id)
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is None:
                return False
            if expiry <= self.clock():
                del self._expiry[key]
                return False
            return True

    def end(self, session_id: str) -> None:
        with self._lock:
            self._expiry.pop(self._key(session_id), None)

    def __len__(self) -> int:
        return len(self._expiry)


def session_cookie(value: str, max_age: int, secure: bool) -> str:
    """A Set-Cookie value: host-only, whole site, HttpOnly, SameSite=Strict, Max-Age and Expires, and
    Secure when the browser reaches the dashboard over HTTPS."""
    expires = formatdate(time.time() + max_age, usegmt=True)
    parts = [f"{COOKIE}={value}", "Path=/", f"Max-Age={max_age}", f"Expires={expires}", "HttpOnly", "SameSite=Strict"]
    return "; ".join(parts + (["Secure"] if secure else []))


def _presented_session(environ: dict) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load(environ.get("HTTP_COOKIE", ""))
    except CookieError:  # a malformed Cookie header is simply no cookie
        return None
    return (jar[COOKIE].value or None) if COOKIE in jar else None


class AccessGate:
    """WSGI middleware in front of the Dash/Flask app.

    ``secure``: mark the session cookie Secure (the dashboard serves HTTPS, or a reverse proxy in front of
    it does); a request that arrives over HTTPS gets a Secure cookie in any case."""

    def __init__(
        self,
        app: Callable,
        token: str | None,
        session_hours: float = DEFAULT_SESSION_HOURS,
        secure: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        check_session_hours(session_hours)
        self.app = app
        self.token = token or None
        self.secure = secure
        self.session_hours = session_hours
        self.sessions = Sessions(session_hours * 3600.0, clock)

    def _secure(self, environ: dict) -> bool:
        return self.secure or environ.get("wsgi.url_scheme") == "https"

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
            return self._login(environ, start_response, query)
        auth = environ.get("HTTP_AUTHORIZATION", "")
        header = auth[7:].strip() if auth.lower().startswith("bearer ") else environ.get("HTTP_X_MDMT_TOKEN", "")
        if header:
            if hmac.compare_digest(header.encode(), self.token.encode()):
                return self.app(environ, start_response)
            return _deny(start_response, "403 Forbidden", "wrong access token")
        session = _presented_session(environ)
        if session is None:
            return _deny(start_response, "401 Unauthorized", f"access token required: {LOGIN_HINT}")
        if self.sessions.valid(session):
            return self.app(environ, start_response)
        # No Set-Cookie deleting the stale cookie here: the answer to a request sent just before a new login
        # would then delete the new session's cookie, which has the same name.
        return _deny(
            start_response,
            "401 Unauthorized",
            f"your session has expired or is not known to this server (a session lasts {self.session_hours:g} "
            f"hours from its login, and a restart of the dashboard ends them all): {LOGIN_HINT}",
        )

    def _login(self, environ: dict, start_response: Callable, query: list[tuple[str, str]]) -> list[bytes]:
        """A new session, its cookie, and a redirect to the same path without the token."""
        old = _presented_session(environ)
        if old:
            self.sessions.end(old)
        session = self.sessions.issue()
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        max_age = max(1, int(self.sessions.lifetime_s))
        start_response(
            "302 Found",
            [
                ("Location", same_origin_path(environ) + (f"?{rest}" if rest else "")),
                ("Content-Length", "0"),
                ("Cache-Control", "no-store"),
                ("Referrer-Policy", "no-referrer"),
                ("Set-Cookie", session_cookie(session, max_age, self._secure(environ))),
            ],
        )
        return [b""]


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

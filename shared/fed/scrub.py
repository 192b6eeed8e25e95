"""What a site says about a failure: an error code and one scrubbed line, built so that no path, file
name or identifier of the site's data can be in it.

The reason is the exception's class name and its message, with every token (a run of characters between
spaces, quotes, brackets, commas, colons, semicolons and ``=``) that could name something on the site's
disk or a patient replaced by a placeholder:

* ``<path>``: a token holding ``/``, ``\\`` or ``~``;
* ``<file>``: a token with a file extension (``A_0001.dcm``, ``labels.csv``; a plain number such as
  ``0.5`` is not one);
* ``<id>``: a token mixing letters and digits (``P012345``, ``A_0001``), or a run of 5 or more digits,
  or a dotted run of numbers (a DICOM UID).

Everything else (words, key names, short numbers) is kept. The full exception stays on the site's own
disk (its error log); only the scrubbed line travels.
"""

from __future__ import annotations

import re

MAX_REASON = 300  # characters of the one line that travels
_SPLIT = re.compile(r"""([\s'"`()\[\]{}<>,;=]+|:(?!\\))""")
_FILE = re.compile(r"^[^.]*[A-Za-z_-][^.]*\.[A-Za-z0-9]{1,5}$|^.+\.[A-Za-z][A-Za-z0-9]{0,4}$")
_NUMBER = re.compile(r"^[+-]?(\d{1,4}|\d+\.\d+(e[+-]?\d+)?|\d+e[+-]?\d+)\.?$", re.IGNORECASE)
_UID = re.compile(r"^\d+(\.\d+){2,}$")
_LONG_DIGITS = re.compile(r"\d{5,}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z_-]*[.?!]?$")  # a word or a kebab/snake-case key, maybe ending a sentence
PLACEHOLDERS = ("<path>", "<file>", "<id>")


def scrub_token(token: str) -> str:
    """One token as it may travel: itself, or a placeholder."""
    if not token or _SPLIT.fullmatch(token):
        return token
    if any(c in token for c in "/\\~"):
        return "<path>"
    if _NUMBER.match(token) or _NAME.match(token):
        return token
    if _UID.match(token) or _LONG_DIGITS.search(token):
        return "<id>"
    if _FILE.match(token.rstrip(".")):
        return "<file>"
    if re.search(r"\d", token) and re.search(r"[A-Za-z]", token):
        return "<id>"
    if re.search(r"\d", token):  # digits with other characters: a date, a number with a unit, a code
        return "<id>"
    return token


def scrub_text(text: str) -> str:
    """``text`` on one line with every path-, file- and ID-like token replaced (see the module)."""
    line = " ".join(str(text).split())
    out = "".join(scrub_token(t) for t in _SPLIT.split(line) if t)
    return out[:MAX_REASON]


def scrub_exception(exc: BaseException) -> str:
    """The reason a site sends for ``exc``: ``<ExceptionClass>: <scrubbed message>``."""
    name = type(exc).__name__
    name = name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else "Exception"
    message = scrub_text(str(exc))
    return f"{name}: {message}" if message else name

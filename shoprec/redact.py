"""What may appear in logs: user ids only as a short hash, never raw; exceptions by type
and place, never by message; URLs without their passwords.

A user id is personal data; a log line needs only to tell one user from
another and to be matched against ``user_ref`` of a known id by an operator
(``shoprec`` prints the same reference for the same id everywhere).
"""

from __future__ import annotations

import hashlib
import traceback
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_PREFIX = "u#"


def user_ref(user_id: str | bytes | None) -> str:
    """``u#`` and the first 12 hex digits of the id's SHA-256 (``u#-`` for none)."""
    if user_id is None:
        return f"{_PREFIX}-"
    raw = user_id if isinstance(user_id, bytes) else user_id.encode("utf-8", "surrogatepass")
    return _PREFIX + hashlib.sha256(raw).hexdigest()[:12]


def exception_ref(exc: BaseException) -> str:
    """The exception's type and where it was raised, never its message.

    Messages of exceptions raised while processing an event often quote the event
    (``KeyError('alice@example.com')``); the code location is what on-call needs in a
    log line, and the dead-letter record keeps the full text next to the original bytes.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno} in {last.name}"


def url_without_password(url: str) -> str:
    """``url`` with any password (``user:pw@`` or ``?password=``) replaced by ``***``;
    the scheme, user, hosts, database and the other parameters stay readable."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if has_password else netloc
    query = urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)],
        safe="*/",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

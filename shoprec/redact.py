"""What may appear in logs: user ids only as a short hash, never raw.

A user id is personal data; a log line needs only to tell one user from
another and to be matched against ``user_ref`` of a known id by an operator
(``shoprec`` prints the same reference for the same id everywhere).
"""

from __future__ import annotations

import hashlib

_PREFIX = "u#"


def user_ref(user_id: str | bytes | None) -> str:
    """``u#`` and the first 12 hex digits of the id's SHA-256 (``u#-`` for none)."""
    if user_id is None:
        return f"{_PREFIX}-"
    raw = user_id if isinstance(user_id, bytes) else user_id.encode("utf-8", "surrogatepass")
    return _PREFIX + hashlib.sha256(raw).hexdigest()[:12]

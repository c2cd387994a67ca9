"""Text a peer sent, made safe to log: escaped and capped.

A silo's certificate proves who it is, not that its strings are harmless: a newline in a software
version would forge a log line, and a 3 MB status would become a 3 MB log line. Every string a
peer supplies passes through :func:`shown` before it reaches a log, an event or a report.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200


def shown(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` with control and non-ASCII characters escaped (``\\n``, ``\\x1b``, ``\\u2028``) and at
    most ``limit`` characters of it kept, the rest counted."""
    head = text[:limit].encode("unicode_escape").decode("ascii")
    rest = len(text) - limit
    return head if rest <= 0 else f"{head}... ({rest} more characters)"

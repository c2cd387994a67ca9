"""The naming rules every party applies: silo ids and network addresses.

A silo id appears in certificates (SAN URI), in federation.yaml's allow-list, in site.yaml and on
the wire, so one rule serves all of them; a config, a certificate and a peer's message are checked
against the same pattern.
"""

from __future__ import annotations

import re

SILO_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""1-63 characters of a-z, 0-9 and '-', starting with a letter or digit (a DNS label, lower case)."""

SILO_ID_RE = re.compile(SILO_ID_PATTERN)

ADDRESS_PATTERN = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
"""host:port, the host a name, an IPv4 address or a bracketed IPv6 address."""


def is_silo_id(value: object) -> bool:
    """Whether ``value`` is a string that follows the silo-id rule."""
    return isinstance(value, str) and SILO_ID_RE.fullmatch(value) is not None

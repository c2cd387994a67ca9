"""The coordinator's audit trail: who called what, from where, and what came of it.

Every call that reaches the coordinator's application layer becomes one JSON line in
``audit.jsonl`` in the run directory: the time, the method, the peer's address, the certificate's
subject and silo id where one was verified, the outcome (``ok``, ``refused`` or ``error``), the
status code and, for a refusal, the reason. Refusals of the identity check (a revoked or off-list
certificate, one of the wrong usage) are recorded before the call is aborted; refusals of the
protocol (stale stage, repeated upload, bounds) when the servicer answers.

The file is opened for appending only and is readable by the service's user alone (0600): it
names silos and their addresses. Every string a peer could choose passes through
:func:`federation.untrusted.shown`, and JSON escapes what is left, so a line cannot be forged.
A TLS handshake that fails (no certificate, another CA, an expired certificate) ends inside
gRPC's core, which reports it to no application callback; those refusals are not in this file.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from federation.untrusted import shown

Outcome = Literal["ok", "refused", "error"]

_REASON_CHARS = 400


class AuditLog:
    """Append-only JSON lines at ``path`` (created 0600), safe to call from many threads."""

    def __init__(
        self, path: str | os.PathLike[str], on_record: Callable[[str, Outcome, str], None] | None = None
    ) -> None:
        self.path = Path(path)
        # Told (method, outcome, code) of every record: the metrics endpoint counts calls from here.
        self.on_record = on_record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: every write lands at the end whatever else holds the file open.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._fd, 0o600)
        self._lock = threading.Lock()

    def record(
        self,
        *,
        method: str,
        outcome: Outcome,
        code: str,
        peer: str,
        silo: str | None = None,
        subject: str | None = None,
        reason: str = "",
    ) -> None:
        """Append one line; ``peer``, ``subject`` and ``reason`` may come from the caller, so are escaped."""
        doc: dict[str, object] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "method": shown(method, 128),
            "outcome": outcome,
            "code": code,
            "peer": shown(peer, 128),
        }
        if silo is not None:
            doc["silo"] = silo
        if subject is not None:
            doc["subject"] = shown(subject, 256)
        if reason:
            doc["reason"] = shown(reason, _REASON_CHARS)
        line = (json.dumps(doc) + "\n").encode("ascii")
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, line)
        if self.on_record is not None:
            self.on_record(doc["method"], outcome, code)

    def close(self) -> None:
        """Stop recording; later calls to :meth:`record` are dropped."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """Every line of an audit file, parsed (for operators' tools and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

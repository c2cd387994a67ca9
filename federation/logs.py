"""Logging for the long-running processes: readable lines on stderr, JSON lines in a file.

The coordinator and the silo agent log through stdlib logging. :func:`configure` sends every
record to stderr as one readable line and, when a path is given, to a file as one JSON object
per line (time, level, logger, message, and the ``event`` fields a caller passes with
``extra={"event": {...}}``), for tools that follow a run. Records never carry patient data or
key material; the callers take care of that.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as compact JSON text."""
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            doc.update({k: v for k, v in event.items() if k not in doc})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: int = logging.INFO, json_path: str | Path | None = None) -> None:
    """Replace the root logger's handlers: text on stderr, and JSON lines at ``json_path`` if given."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    text = logging.StreamHandler(sys.stderr)
    text.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root.addHandler(text)
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Events name silos, rounds and refusals: readable by the service's user alone, as metrics are.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(path, 0o600)
        structured = logging.FileHandler(path, encoding="utf-8")
        structured.setFormatter(JsonLinesFormatter())
        root.addHandler(structured)

"""Logging for the long-running processes: readable lines on stderr, JSON lines in a file.

The coordinator and the silo agent log through stdlib logging. :func:`configure` sends every
record to stderr as one readable line and, when a path is given, to a file as one JSON object
per line (time, level, logger, message, and the ``event`` fields a caller passes with
``extra={"event": {...}}``), for tools that follow a run. The file is rotated by size and every
generation is created readable by the service's user alone. A logging config file
(``--log-config logging.yaml``, :class:`LogSettings`) sets the level, the stderr format and the
rotation. Records never carry patient data or key material; the callers take care of that.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Literal

from pydantic import Field

from condi_models.configfile import StrictModel, load_config

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


class LogSettings(StrictModel):
    """What a logging config file (``--log-config``) may set; every field has a default."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stderr: Literal["text", "json", "off"] = Field(
        default="text", description="stderr lines: readable text, JSON (for journald or a collector), or none"
    )
    file_max_mb: float = Field(default=50.0, gt=0, le=10_000, description="rotate events.jsonl at this size")
    file_backups: int = Field(default=5, ge=1, le=1000, description="rotated generations kept")


def load_log_settings(path: str | Path | None, verbose: bool = False) -> LogSettings:
    """The settings in ``path`` (a YAML file, errors name it), or the defaults; ``verbose`` forces DEBUG."""
    settings = LogSettings() if path is None else load_config(path, LogSettings)
    return settings.model_copy(update={"level": "DEBUG"}) if verbose else settings


class PrivateRotatingFileHandler(RotatingFileHandler):
    """A size-rotated log file whose every generation is created mode 0600: events name silos,
    rounds and refusals, readable by the service's user alone, as metrics are."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def configure(
    level: int = logging.INFO, json_path: str | Path | None = None, settings: LogSettings | None = None
) -> None:
    """Replace the root logger's handlers: stderr as ``settings`` say (text by default), and JSON
    lines at ``json_path`` if given, rotated by size. ``settings`` overrides ``level``."""
    if settings is not None:
        level = logging.getLevelName(settings.level)
    settings = settings or LogSettings()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    if settings.stderr != "off":
        text = logging.StreamHandler(sys.stderr)
        text.setFormatter(JsonLinesFormatter() if settings.stderr == "json" else logging.Formatter(_TEXT_FORMAT))
        root.addHandler(text)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        add_json_file(json_path, settings)


def add_json_file(path: str | Path, settings: LogSettings | None = None) -> logging.Handler:
    """Also write every record as JSON lines to ``path`` (rotated as ``settings`` say) until
    :func:`remove_handler`: a long-lived coordinator gives each run its own events.jsonl."""
    settings = settings or LogSettings()
    handler = PrivateRotatingFileHandler(
        path, maxBytes=int(settings.file_max_mb * 1024 * 1024), backupCount=settings.file_backups, encoding="utf-8"
    )
    handler.setFormatter(JsonLinesFormatter())
    logging.getLogger().addHandler(handler)
    return handler


def remove_handler(handler: logging.Handler) -> None:
    """Detach and close a handler :func:`add_json_file` added."""
    logging.getLogger().removeHandler(handler)
    handler.close()

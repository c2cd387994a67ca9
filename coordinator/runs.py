"""The long-lived coordinator's runs: submitted, queued, run one after another, each in its own
directory.

``runs_dir/runs.json`` lists every run the service was given: its id, name, state (``queued``,
``running``, ``complete``, ``failed``, ``cancelled``, ``stopped``), when it was submitted, started
and ended, and a message. A run's directory ``runs_dir/<id>`` holds the run file as submitted
(``run.yaml``) and, once it starts, everything a single-run coordinator writes there (checkpoint,
status, metrics, events, report). The file is rewritten atomically on every change, so a service
killed at any point restarts with its queue; a run found ``running`` is resumed from its
checkpoint first.

A run file is checked when it is submitted (size, YAML, the merged config validates), so a bad
one is refused at once with the reason, and nothing reaches the queue that cannot start.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml

from condi_models.checkpoint import atomic_write_bytes
from condi_models.configfile import ConfigError
from coordinator.config import FederationConfig, run_config
from coordinator.server import new_run_id

RunState = Literal["queued", "running", "complete", "failed", "cancelled", "stopped"]
FINISHED: frozenset[str] = frozenset({"complete", "failed", "cancelled"})
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(ValueError):
    """A submission or request the queue refuses; the message says why."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunEntry:
    """One run of the service."""

    id: str
    name: str
    state: RunState
    submitted: str
    started: str | None = None
    ended: str | None = None
    message: str = ""
    cancel_requested: bool = False


class RunQueue:
    """The service's runs, persisted in ``runs_dir/runs.json``; safe to use from many threads."""

    def __init__(self, base: FederationConfig) -> None:
        assert base.service is not None
        self.base = base
        self.settings = base.service
        self.root = Path(base.service.runs_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "runs.json"
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self._runs: list[RunEntry] = []
        if self.path.exists():
            try:
                self._runs = [RunEntry(**doc) for doc in json.loads(self.path.read_text(encoding="utf-8"))]
            except (OSError, ValueError, TypeError) as exc:
                raise RunError(f"{self.path}: unreadable run list ({exc}); move it aside to start afresh") from exc

    def _save(self) -> None:
        text = json.dumps([asdict(r) for r in self._runs], indent=1) + "\n"
        atomic_write_bytes(self.path, text.encode("utf-8"))

    def run_dir(self, run_id: str) -> Path:
        """The directory of run ``run_id`` (an id of this queue's form, else RunError)."""
        if not _RUN_ID.fullmatch(run_id):
            raise RunError(f"{run_id!r} is not a run id")
        return self.root / run_id

    def config(self, run_id: str) -> FederationConfig:
        """The run's config: the service's federation.yaml with its run file laid over it."""
        path = self.run_dir(run_id) / "run.yaml"
        return run_config(self.base, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, path.parent, str(path))

    def submit(self, text: str, source: str) -> RunEntry:
        """Check a run file's text and queue it; returns its entry (RunError says why not)."""
        size = len(text.encode("utf-8"))
        if size > self.settings.max_run_file_bytes:
            raise RunError(f"{source}: {size} bytes; a run file may have at most {self.settings.max_run_file_bytes}")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RunError(f"{source}: not YAML ({exc})") from None
        with self._lock:
            if sum(r.state == "queued" for r in self._runs) >= self.settings.max_queued:
                raise RunError(f"{self.settings.max_queued} runs are already queued (service.max_queued)")
            try:
                cfg = run_config(self.base, raw, self.root / "pending", source)
            except ConfigError as exc:
                raise RunError(str(exc)) from None
            entry = RunEntry(id=new_run_id(cfg.name), name=cfg.name, state="queued", submitted=_now())
            run_dir = self.root / entry.id
            run_dir.mkdir(mode=0o700)
            atomic_write_bytes(run_dir / "run.yaml", text.encode("utf-8"))
            self._runs.append(entry)
            self._save()
            self.changed.notify_all()
        return entry

    def list(self) -> list[RunEntry]:
        """Every run, oldest first."""
        with self._lock:
            return list(self._runs)

    def get(self, run_id: str) -> RunEntry:
        """The entry of ``run_id`` (RunError when there is none)."""
        with self._lock:
            return self._get(run_id)

    def _get(self, run_id: str) -> RunEntry:
        for entry in self._runs:
            if entry.id == run_id:
                return entry
        raise RunError(f"no run {run_id!r}")

    def _set(self, run_id: str, **changes: object) -> RunEntry:
        entry = replace(self._get(run_id), **changes)
        self._runs = [entry if r.id == run_id else r for r in self._runs]
        self._save()
        self.changed.notify_all()
        return entry

    def next_to_run(self) -> RunEntry | None:
        """The run to carry out now: one left ``running`` or ``stopped`` by an earlier service, else the
        oldest queued; marked running."""
        with self._lock:
            for wanted in (("running", "stopped"), ("queued",)):
                for entry in self._runs:
                    if entry.state in wanted:
                        return self._set(entry.id, state="running", started=entry.started or _now())
        return None

    def finish(self, run_id: str, state: RunState, message: str) -> RunEntry:
        """Record how a run ended."""
        with self._lock:
            return self._set(run_id, state=state, message=message, ended=None if state == "stopped" else _now())

    def cancel(self, run_id: str) -> RunEntry:
        """Cancel a queued run at once; a running one is marked for the service to stop (it then ends
        ``cancelled``). A finished run cannot be cancelled."""
        with self._lock:
            entry = self._get(run_id)
            if entry.state in FINISHED:
                raise RunError(f"run {run_id} has already ended ({entry.state})")
            if entry.state == "queued":
                return self._set(run_id, state="cancelled", ended=_now(), message="cancelled before it started")
            return self._set(run_id, cancel_requested=True)

    def wait(self, timeout: float) -> None:
        """Block until the queue changes or ``timeout`` seconds pass."""
        with self._lock:
            self.changed.wait(timeout)

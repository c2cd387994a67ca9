"""What a silo agent is doing, for `silo-agent status` and its metrics endpoint.

The agent keeps an :class:`AgentStatus` and rewrites ``status.json`` in its state directory
(atomically) whenever it changes: the run, what it is doing, the task in hand and its deadline,
the last finished task, the last error, and counts of tasks and bytes. `silo-agent status`
reads that file and adds what the state directory itself says: the DP budget spent (from the
privacy ledger) and the disk used, so it works whether the agent runs or not. Nothing here is
patient data: counts of tasks and bytes, stage names, times and messages the agent logs anyway.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from condi_models.checkpoint import atomic_write_bytes
from condi_models.privacy import LedgerError, PrivacyLedger
from federation.stages import StageKey, stage_name
from federation.untrusted import shown
from silo_agent.state import LEDGER_FILE

STATUS_FILE = "status.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class AgentStatus:
    """The agent's current activity, kept in memory and in ``state_dir/status.json``."""

    def __init__(self, state_dir: str | Path, silo_id: str, coordinator: str) -> None:
        self.path = Path(state_dir) / STATUS_FILE
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {
            "silo_id": silo_id,
            "coordinator": coordinator,
            "pid_started": _now(),
            "activity": "starting",
            "run_id": None,
            "task": None,
            "last_task": None,
            "last_error": None,
            "tasks_done": {},
            "errors": 0,
            "bytes_uploaded": 0,
            "bytes_downloaded": 0,
            "updated": _now(),
        }
        self._write()

    def _write(self) -> None:
        self._doc["updated"] = _now()
        atomic_write_bytes(self.path, (json.dumps(self._doc, indent=1) + "\n").encode("utf-8"))

    def snapshot(self) -> dict[str, Any]:
        """A copy of the current status."""
        with self._lock:
            return json.loads(json.dumps(self._doc))

    def activity(self, what: str, run_id: str | None = None) -> None:
        """What the agent does now: joining, waiting, done, left, stopped."""
        with self._lock:
            self._doc["activity"] = what
            if run_id is not None:
                self._doc["run_id"] = run_id
            self._write()

    def task_started(self, key: StageKey, remaining_ms: int) -> None:
        """A task is taken; its deadline is now plus the time the coordinator said was left."""
        with self._lock:
            self._doc["activity"] = "working"
            self._doc["task"] = {
                "round": key.round, "attempt": key.attempt, "stage": stage_name(key.stage).lower(), "started": _now(),
                "deadline": datetime.fromtimestamp(time.time() + remaining_ms / 1000.0, UTC).isoformat(
                    timespec="seconds"
                ),
            }
            self._started = time.monotonic()
            self._write()

    def task_finished(self, key: StageKey, error: str | None = None) -> None:
        """The task in hand ended, acknowledged or with ``error`` (the message the agent logged)."""
        with self._lock:
            stage = stage_name(key.stage).lower()
            seconds = round(time.monotonic() - getattr(self, "_started", time.monotonic()), 3)
            self._doc["task"] = None
            self._doc["activity"] = "waiting"
            self._doc["last_task"] = {
                "round": key.round, "attempt": key.attempt, "stage": stage, "finished": _now(),
                "seconds": seconds, "ok": error is None,
            }
            if error is None:
                self._doc["tasks_done"][stage] = self._doc["tasks_done"].get(stage, 0) + 1
            else:
                self._error(error)
            self._write()

    def error(self, message: str) -> None:
        """Record an error the agent logged (a refused call, a lost coordinator)."""
        with self._lock:
            self._error(message)
            self._write()

    def _error(self, message: str) -> None:
        self._doc["errors"] += 1
        self._doc["last_error"] = {"time": _now(), "message": shown(message, 400)}

    def transferred(self, *, uploaded: int = 0, downloaded: int = 0) -> None:
        """Count payload bytes sent or received."""
        with self._lock:
            self._doc["bytes_uploaded"] += uploaded
            self._doc["bytes_downloaded"] += downloaded


def _disk_used(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def read_status(state_dir: str | Path, *, delta: float | None = None, accountant: str = "rdp") -> dict[str, Any]:
    """``status.json`` of the agent with ``state_dir`` (None fields when it never ran), the DP
    epsilon spent from its ledger when ``delta`` is given, and the disk the directory uses."""
    root = Path(state_dir)
    try:
        status = json.loads((root / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        status = None
    epsilon = None
    if delta is not None and (root / LEDGER_FILE).exists():
        try:
            epsilon = PrivacyLedger.load(root / LEDGER_FILE).epsilon(delta=delta, accountant=accountant)
        except (LedgerError, OSError) as exc:
            epsilon = f"unreadable: {exc}"
    return {
        "state_dir": str(root),
        "found": status is not None,
        "status": status,
        "epsilon_spent": epsilon,
        "disk_bytes": _disk_used(root) if root.exists() else 0,
    }


def status_text(snap: dict[str, Any], target_epsilon: float | None = None) -> str:
    """A few readable lines for `silo-agent status`."""
    s = snap["status"]
    if s is None:
        return f"no agent status in {snap['state_dir']} (the agent has not run with this state directory)"
    lines = [
        f"silo       {s['silo_id']} -> {s['coordinator']}",
        f"run        {s.get('run_id') or 'none yet'}",
        f"activity   {s['activity']} (updated {s['updated']})",
    ]
    if s.get("task"):
        t = s["task"]
        lines.append(f"task       round {t['round'] + 1} {t['stage']} attempt {t['attempt']}, deadline {t['deadline']}")
    if s.get("last_task"):
        t = s["last_task"]
        lines.append(
            f"last task  round {t['round'] + 1} {t['stage']}: {'done' if t['ok'] else 'failed'} at {t['finished']} "
            f"in {t['seconds']:.1f} s"
        )
    done = ", ".join(f"{k} {v}" for k, v in sorted(s.get("tasks_done", {}).items())) or "none"
    lines.append(f"tasks done {done}; errors {s.get('errors', 0)}")
    if s.get("last_error"):
        lines.append(f"last error {s['last_error']['time']} {s['last_error']['message']}")
    eps = snap["epsilon_spent"]
    if eps is None:
        lines.append("DP         off" if target_epsilon is None else "DP         nothing spent yet")
    else:
        lines.append(f"DP         epsilon spent {eps if isinstance(eps, str) else f'{eps:.3f}'}"
                     + (f" of {target_epsilon:g}" if target_epsilon is not None else ""))
    lines.append(f"disk       {snap['disk_bytes'] / 1e6:.1f} MB in {snap['state_dir']}")
    return "\n".join(lines)


class SiloCollector(Collector):
    """The agent's status as Prometheus metrics, read at every scrape."""

    def __init__(self, status: AgentStatus, epsilon: Any) -> None:
        self.status = status
        # A callable returning (spent, target) or None without DP.
        self.epsilon = epsilon

    def collect(self) -> Iterator[Metric]:
        s = self.status.snapshot()
        tasks = CounterMetricFamily("condi_silo_tasks", "Tasks finished and acknowledged, by stage", labels=["stage"])
        for stage, n in sorted(s["tasks_done"].items()):
            tasks.add_metric([stage], n)
        yield tasks
        yield CounterMetricFamily("condi_silo_errors", "Errors the agent logged (refused calls, failed tasks)",
                                  value=s["errors"])
        yield CounterMetricFamily("condi_silo_bytes_uploaded", "Payload bytes uploaded", value=s["bytes_uploaded"])
        yield CounterMetricFamily("condi_silo_bytes_downloaded", "Payload bytes downloaded",
                                  value=s["bytes_downloaded"])
        yield GaugeMetricFamily("condi_silo_working", "1 while a task is in hand", value=float(s["task"] is not None))
        if s.get("last_task"):
            yield GaugeMetricFamily("condi_silo_last_task_round", "Round of the last finished task",
                                    value=s["last_task"]["round"])
            yield GaugeMetricFamily("condi_silo_last_task_seconds", "Wall time of the last finished task",
                                    value=s["last_task"]["seconds"])
        eps = self.epsilon()
        if eps is not None:
            spent, target = eps
            yield GaugeMetricFamily("condi_silo_epsilon_spent", "DP epsilon spent over the rounds taken part in",
                                    value=spent)
            yield GaugeMetricFamily("condi_silo_epsilon_target", "DP epsilon budget", value=target)


def silo_registry(status: AgentStatus, epsilon: Any) -> CollectorRegistry:
    """A registry holding the agent's metrics."""
    registry = CollectorRegistry()
    registry.register(SiloCollector(status, epsilon))
    return registry

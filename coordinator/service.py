"""`coordinator serve`: a coordinator that stays up and runs federations one after another.

The gRPC server, its certificates, the silos' allow-list, the audit log and the monitor are the
service's and live as long as it does (federation.yaml's fixed fields). Runs come from the
operator through the admin socket (:mod:`coordinator.admin`: ``coordinator submit run.yaml``) or
as files dropped in ``service.watch_dir``; each is a federation.yaml's run fields laid over the
service's (:func:`coordinator.config.run_config`), queued in ``runs_dir/runs.json``
(:mod:`coordinator.runs`) and carried out in order, each by its own :class:`Coordinator` in its
own directory with its own checkpoint, events, report and model. Between runs every silo call
is answered UNAVAILABLE, which a silo agent started with ``--stay-up`` waits out.

Stopping the service (SIGTERM) stops the run in progress at its checkpoint; the next start
resumes it before anything queued after it.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.admin import AdminServer
from coordinator.app import CoordinatorServer
from coordinator.config import FederationConfig
from coordinator.monitor import run_snapshot
from coordinator.runs import FINISHED, RunEntry, RunError, RunQueue
from coordinator.server import Coordinator
from federation import logs

log = logging.getLogger(__name__)

_EVENTS_PER_CALL = 1000
_IDLE_S = 2.0


class CoordinatorService:
    """The long-lived coordinator: one server, a run queue, an admin socket."""

    def __init__(self, cfg: FederationConfig, source: str | Path, log_settings: logs.LogSettings | None = None) -> None:
        if cfg.service is None:
            raise RunError(f"{source}: `coordinator serve` needs a service: section (runs_dir, admin_socket)")
        self.cfg = cfg
        self.log_settings = log_settings
        self.queue = RunQueue(cfg)
        self.server = CoordinatorServer(cfg, source, runs=True)
        self.server.list_runs = lambda: [asdict(r) for r in self.queue.list()]
        self.admin = AdminServer(cfg.service.admin_socket, self.handle)
        self.watch_dir = None if cfg.service.watch_dir is None else Path(cfg.service.watch_dir)
        self.stopping = threading.Event()
        self._current: RunEntry | None = None

    # ---- the admin socket -------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes, query: dict[str, list[str]]) -> tuple[int, Any]:
        """Answer one admin request (see :mod:`coordinator.admin` for the routes)."""
        parts = [p for p in path.split("/") if p]
        try:
            if parts == ["runs"] and method == "GET":
                return 200, [asdict(r) for r in self.queue.list()]
            if parts == ["runs"] and method == "POST":
                entry = self.queue.submit(body.decode("utf-8", errors="replace"), "the submitted run file")
                log.info("run %s (%s) submitted", entry.id, entry.name)
                return 201, asdict(entry)
            if len(parts) == 2 and parts[0] == "runs" and method == "GET":
                entry = self.queue.get(parts[1])
                return 200, {**asdict(entry), "snapshot": run_snapshot(self.queue.run_dir(entry.id), events=20)}
            if len(parts) == 3 and parts[:1] == ["runs"] and parts[2] == "events" and method == "GET":
                return 200, self._events(parts[1], int((query.get("after") or ["0"])[0]))
            if len(parts) == 3 and parts[:1] == ["runs"] and parts[2] == "cancel" and method == "POST":
                return 200, asdict(self._cancel(parts[1]))
        except RunError as exc:
            return 400, {"error": str(exc)}
        except ValueError:
            return 400, {"error": "after: expected a line number"}
        return 404, {"error": f"no such request: {method} {path}"}

    def _events(self, run_id: str, after: int) -> dict[str, Any]:
        self.queue.get(run_id)
        path = self.queue.run_dir(run_id) / "events.jsonl"
        lines: list[str] = []
        if path.exists():
            with path.open(encoding="utf-8", errors="replace") as fh:
                for number, line in enumerate(fh):
                    if number >= after and line.endswith("\n"):
                        lines.append(line.rstrip("\n"))
                        if len(lines) >= _EVENTS_PER_CALL:
                            break
        return {"lines": lines, "next": after + len(lines), "state": self.queue.get(run_id).state}

    def _cancel(self, run_id: str) -> RunEntry:
        entry = self.queue.cancel(run_id)
        current = self.server.coordinator
        if entry.state == "running" and current is not None and self._current is not None and \
                self._current.id == run_id:
            log.warning("run %s: cancelled by the operator; stopping it", run_id)
            current.stop()
        return entry

    # ---- the watched folder -----------------------------------------------------------------

    def _scan_watch_dir(self) -> None:
        if self.watch_dir is None or not self.watch_dir.is_dir():
            return
        for path in sorted(self.watch_dir.glob("*.yaml")):
            try:
                entry = self.queue.submit(path.read_text(encoding="utf-8", errors="replace"), str(path))
            except RunError as exc:
                log.error("%s refused: %s", path, exc)
                (self.watch_dir / "rejected").mkdir(exist_ok=True)
                shutil.move(path, self.watch_dir / "rejected" / path.name)
                (self.watch_dir / "rejected" / f"{path.name}.error").write_text(f"{exc}\n", encoding="utf-8")
                continue
            log.info("run %s (%s) submitted from %s", entry.id, entry.name, path)
            (self.watch_dir / "submitted").mkdir(exist_ok=True)
            shutil.move(path, self.watch_dir / "submitted" / f"{entry.id}.yaml")

    # ---- the runs ---------------------------------------------------------------------------

    def _carry_out(self, entry: RunEntry) -> None:
        run_dir = self.queue.run_dir(entry.id)
        try:
            coordinator = Coordinator(
                self.queue.config(entry.id), revocations=self.server.revocations, run_id=entry.id
            )
        except Exception as exc:  # a run that cannot start must not end the service
            log.exception("run %s could not start", entry.id)
            self.queue.finish(entry.id, "failed", f"could not start: {exc}")
            return
        events = logs.add_json_file(run_dir / "events.jsonl", self.log_settings)
        self._current = entry
        self.server.begin(coordinator)
        log.info("run %s (%s) started", entry.id, entry.name)
        try:
            code = coordinator.run()
        finally:
            self.server.end()
            self._current = None
            logs.remove_handler(events)
        outcome = coordinator.driver.outcome
        message = outcome[1] if outcome is not None else ""
        if self.queue.get(entry.id).cancel_requested:
            state, message = "cancelled", "cancelled by the operator"
        elif code == 0:
            state = "complete"
        elif outcome is None or self.stopping.is_set():
            state, message = "stopped", "the service stopped; the run resumes when it starts again"
        else:
            state = "failed"
        self.queue.finish(entry.id, state, message)
        log.info("run %s %s%s", entry.id, state, f": {message}" if message else "")

    def serve(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the exit status (0)."""
        self.server.start()
        self.admin.start()

        def on_signal(signum: int, _frame: object) -> None:
            log.warning("received signal %d; stopping the service", signum)
            self.stopping.set()
            if self.server.coordinator is not None:
                self.server.coordinator.stop()
            with self.queue.changed:
                self.queue.changed.notify_all()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping.is_set():
                self._scan_watch_dir()
                entry = self.queue.next_to_run()
                if entry is None:
                    self.queue.wait(_IDLE_S)
                    continue
                if entry.state in FINISHED:
                    continue
                self._carry_out(entry)
            return 0
        finally:
            self.admin.stop()
            self.server.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

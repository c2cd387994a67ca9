"""The coordinator service: a :class:`~coordinator.server.Coordinator` behind a mutual-TLS gRPC server.

:class:`CoordinatorServer` wires the parts together: the federation CA and its reloading CRL,
the per-call identity check (:class:`~federation.identity.IdentityInterceptor`), the servicer
(:mod:`coordinator.servicer`), the health service, the audit log (``audit.jsonl`` in the run
directory) and, when federation.yaml asks, the local monitor: Prometheus metrics and the live
web view (:mod:`coordinator.monitor`). :func:`serve` runs one federation to its end and returns the process exit code.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from coordinator.config import FederationConfig, check_federation_files
from coordinator.monitor import run_snapshot, web_routes
from coordinator.server import Coordinator
from coordinator.servicer import METHOD_NAMES, FederationServicer
from federation import identity, pki, tls
from federation.audit import AuditLog
from federation.faults import FaultPoint
from federation.monitor_http import MonitorServer
from federation.service_metrics import CoordinatorMetrics

log = logging.getLogger(__name__)


class CoordinatorServer:
    """The mutual-TLS gRPC server with per-call identity, health service, audit log and monitor,
    in front of one run's :class:`Coordinator` (``serve``) or of each run in turn
    (:mod:`coordinator.service`, which calls :meth:`begin` and :meth:`end`)."""

    def __init__(
        self, cfg: FederationConfig, source: str | Path, *, exit_at: FaultPoint | None = None, runs: bool = False
    ) -> None:
        check_federation_files(cfg, source)
        assert cfg.tls is not None
        self.cfg = cfg
        ca = pki.load_certificate(cfg.tls.ca)
        self.revocations = identity.RevocationList(cfg.tls.crl, ca)
        self.coordinator: Coordinator | None = None
        if runs:
            assert cfg.service is not None
            home = Path(cfg.service.runs_dir)
        else:
            self.coordinator = Coordinator(cfg, revocations=self.revocations, exit_at=exit_at)
            home = self.coordinator.run_dir
        self.metrics = CoordinatorMetrics(self._snapshot, cfg.silos, list(METHOD_NAMES))
        # Opened after the coordinator: a run directory it refuses (another federation's) is left untouched.
        self.audit = AuditLog(home / "audit.jsonl", on_record=self.metrics.call)
        self.monitor = (
            None if cfg.monitor is None
            else MonitorServer(cfg.monitor, self.metrics.registry, web_routes(self._run_dir, self._runs))
        )
        self.list_runs: Callable[[], list[dict[str, Any]]] | None = None
        interceptor = identity.IdentityInterceptor(ca, self.revocations, cfg.silos, audit=self.audit)
        credentials = tls.server_credentials(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
        # Each silo may have max_calls_per_silo calls in progress (the servicer refuses more), so the
        # workers cannot all be taken by one silo; a few more serve health checks.
        workers = cfg.max_calls_per_silo * len(cfg.silos) + 8
        self._bound = tls.secure_server(
            cfg.listen, credentials, interceptors=[interceptor], max_workers=workers, max_concurrent_rpcs=workers
        )
        self.servicer = FederationServicer(
            self.coordinator, max_calls_per_silo=cfg.max_calls_per_silo, audit=self.audit
        )
        self.servicer.register(self._bound.server)
        self._health = tls.add_health_service(self._bound.server)
        self.port = self._bound.port

    def _run_dir(self) -> Path | None:
        return None if self.coordinator is None else self.coordinator.run_dir

    def _snapshot(self) -> dict[str, Any]:
        run_dir = self._run_dir()
        return {} if run_dir is None else run_snapshot(run_dir, events=0)

    def _runs(self) -> list[dict[str, Any]]:
        return [] if self.list_runs is None else self.list_runs()

    def begin(self, coordinator: Coordinator) -> None:
        """Serve ``coordinator``'s run from now on."""
        self.coordinator = coordinator
        self.servicer.run = coordinator

    def end(self) -> None:
        """Between runs: every call is answered UNAVAILABLE until the next :meth:`begin`."""
        self.servicer.run = None
        self.coordinator = None

    def start(self) -> int:
        """Start serving; returns the port."""
        self._bound.server.start()
        log.info("coordinator of %s serving on port %d", self.cfg.name, self.port)
        if self.monitor is not None:
            self.monitor.start()
        return self.port

    def stop(self) -> None:
        """Report NOT_SERVING, end held calls and stop the server."""
        for name in ("", tls.FEDERATION_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.coordinator is not None:
            self.coordinator.stop()
        self._bound.server.stop(grace=2).wait()
        if self.monitor is not None:
            self.monitor.stop()
        self.audit.close()


def serve(cfg: FederationConfig, source: str | Path, *, exit_at: FaultPoint | None = None) -> int:
    """Run the coordinator of ``cfg`` until the run ends; returns the exit code. ``exit_at`` injects a
    crash at a (round, stage) for fault tests."""
    server = CoordinatorServer(cfg, source, exit_at=exit_at)
    server.start()

    coordinator = server.coordinator
    assert coordinator is not None

    def on_signal(signum: int, _frame: object) -> None:
        log.warning("received signal %d; stopping", signum)
        coordinator.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return coordinator.run()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

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
from pathlib import Path

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
    """A :class:`Coordinator` behind a mutual-TLS gRPC server with per-call identity and health service."""

    def __init__(
        self, cfg: FederationConfig, source: str | Path, *, exit_at: FaultPoint | None = None
    ) -> None:
        check_federation_files(cfg, source)
        assert cfg.tls is not None
        ca = pki.load_certificate(cfg.tls.ca)
        revocations = identity.RevocationList(cfg.tls.crl, ca)
        self.coordinator = Coordinator(cfg, revocations=revocations, exit_at=exit_at)
        run_dir = self.coordinator.run_dir
        self.metrics = CoordinatorMetrics(lambda: run_snapshot(run_dir, events=0), cfg.silos, list(METHOD_NAMES))
        # Opened after the coordinator: a run directory it refuses (another federation's) is left untouched.
        self.audit = AuditLog(run_dir / "audit.jsonl", on_record=self.metrics.call)
        self.monitor = (
            None if cfg.monitor is None else MonitorServer(cfg.monitor, self.metrics.registry, web_routes(run_dir))
        )
        interceptor = identity.IdentityInterceptor(ca, revocations, cfg.silos, audit=self.audit)
        credentials = tls.server_credentials(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
        # Each silo may have max_calls_per_silo calls in progress (the servicer refuses more), so the
        # workers cannot all be taken by one silo; a few more serve health checks.
        workers = cfg.max_calls_per_silo * len(cfg.silos) + 8
        self._bound = tls.secure_server(
            cfg.listen, credentials, interceptors=[interceptor], max_workers=workers, max_concurrent_rpcs=workers
        )
        FederationServicer(
            self.coordinator, max_calls_per_silo=cfg.max_calls_per_silo, audit=self.audit
        ).register(self._bound.server)
        self._health = tls.add_health_service(self._bound.server)
        self.port = self._bound.port

    def start(self) -> int:
        """Start serving; returns the port."""
        self._bound.server.start()
        log.info("coordinator of %s serving on port %d", self.coordinator.cfg.name, self.port)
        if self.monitor is not None:
            self.monitor.start()
        return self.port

    def stop(self) -> None:
        """Report NOT_SERVING, end held calls and stop the server."""
        for name in ("", tls.FEDERATION_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
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

    def on_signal(signum: int, _frame: object) -> None:
        log.warning("received signal %d; stopping", signum)
        server.coordinator.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return server.coordinator.run()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

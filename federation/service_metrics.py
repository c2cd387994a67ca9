"""Prometheus metrics of the coordinator, and the local endpoint setting both services share.

Each service owns one registry (never prometheus_client's global one, so two services in one
process, as in tests, do not mix their figures); the silo agent's collector is in
:mod:`silo_agent.status`. What is exported is operational: calls and refusals by method and
status code, rounds, stage seconds, bytes, which silos are connected, the pooled validation
score and training loss the run already shows in its report; at a silo, its tasks, errors,
bytes and its own epsilon spent. No label carries a value a peer chose (refusal reasons are free text and stay
in the audit log; a label takes only the method names and status codes this code knows), so a
hostile silo cannot grow the registry, and nothing here is patient data.

The endpoint (:mod:`federation.monitor_http`) is off by default (``monitor: {listen:
"127.0.0.1:9464"}`` in federation.yaml or site.yaml turns it on) and bound to a loopback address
unless ``allow_remote`` says otherwise: the page names silos and a run's progress, which is for
the hospital's or operator's own monitoring, not for the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Metric, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field, model_validator

from condi_models.configfile import StrictModel
from federation.names import ADDRESS_PATTERN

# A `_created` timestamp beside every counter doubles the page and no dashboard reads it.
disable_created_metrics()


class MonitorEndpoint(StrictModel):
    """Where a service serves its Prometheus text and pages (``monitor:`` in its config)."""

    listen: str = Field(pattern=ADDRESS_PATTERN, description="host:port, e.g. 127.0.0.1:9464")
    allow_remote: bool = Field(
        default=False, description="bind an address other than loopback (put it behind your own access control)"
    )

    @model_validator(mode="after")
    def _local(self) -> MonitorEndpoint:
        host = self.host
        if not self.allow_remote and host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    f"listen: {host} is not a loopback address; the metrics name silos and runs, so serve "
                    "them on 127.0.0.1 or ::1, or set allow_remote: true behind your own access control"
                )
        return self

    @property
    def host(self) -> str:
        """The host part, brackets of an IPv6 literal removed."""
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        """The port part (0: any free port)."""
        return int(self.listen.rsplit(":", 1)[1])


class CoordinatorMetrics:
    """What the coordinator exports: calls counted as the audit log records them, and the current
    run's progress read from its run directory at each scrape (:func:`coordinator.monitor.run_snapshot`
    reads the same files), so the round driver needs no hooks and a scrape never takes its lock."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], silos: list[str], methods: list[str]) -> None:
        self.registry = CollectorRegistry()
        self.methods = frozenset(methods)
        self.calls = Counter(
            "condi_calls", "Calls that reached the coordinator, by method, outcome and status code",
            ["method", "outcome", "code"], registry=self.registry,
        )
        self.registry.register(_RunCollector(snapshot, silos))

    def call(self, method: str, outcome: str, code: str) -> None:
        """Count one call (the audit log's record of it); a method this service does not have counts
        as ``other``, so no caller can add label values."""
        method = method if method in self.methods else "other"
        self.calls.labels(method=method, outcome=outcome, code=code).inc()


class _RunCollector(Collector):
    """Gauges and counters of the run a snapshot describes, built afresh at every scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], silos: list[str]) -> None:
        self.snapshot = snapshot
        self.silos = list(silos)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        status = snap.get("status") or {}
        rows = snap.get("rounds") or []

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))

        yield from gauge("condi_round", "The run's current round (0-based; the round count when done)",
                         status.get("round"))
        yield from gauge("condi_rounds_planned", "Rounds the run has", status.get("rounds"))
        yield CounterMetricFamily("condi_rounds_completed", "Rounds recorded in the run", value=len(rows))
        yield from gauge("condi_run_failed", "1 when the run ended in failure",
                         None if not status else float(status.get("outcome") == "failed"))
        connected = set(status.get("connected") or [])
        per_silo = GaugeMetricFamily("condi_silo_connected", "1 when an allowed silo was heard from within the "
                                     "liveness window", labels=["silo"])
        for silo in self.silos:
            per_silo.add_metric([silo], float(silo in connected))
        yield per_silo
        contact = GaugeMetricFamily("condi_silo_last_contact_timestamp_seconds",
                                    "Unix time of each joined silo's last call (to 10 s)", labels=["silo"])
        for silo, when in (status.get("last_contact") or {}).items():
            if silo in self.silos:
                contact.add_metric([silo], datetime.fromisoformat(when).timestamp())
        yield contact
        stage = CounterMetricFamily("condi_stage_seconds", "Wall time of the recorded rounds' stages, summed",
                                    labels=["stage"])
        for key, name in (("train_stage_s", "train"), ("evaluate_stage_s", "evaluate")):
            stage.add_metric([name], sum(float(r.get(key) or 0.0) for r in rows))
        yield stage
        yield CounterMetricFamily("condi_bytes_received", "Update payload bytes of the recorded rounds",
                                  value=sum(float(r.get("bytes_in") or 0.0) for r in rows))
        yield CounterMetricFamily("condi_bytes_sent", "Global-state payload bytes of the recorded rounds",
                                  value=sum(float(r.get("bytes_out") or 0.0) for r in rows))
        last = next((r for r in reversed(rows) if r.get("val")), None)
        if last is not None:
            yield from gauge("condi_validation_macro_auroc", "Pooled validation macro AUROC, last evaluated round",
                             last["val"].get("macro_auroc"))
            yield from gauge("condi_validation_accuracy", "Pooled validation accuracy, last evaluated round",
                             last["val"].get("accuracy"))
        loss = GaugeMetricFamily("condi_training_loss", "Mean local training loss of the last recorded round",
                                 labels=["phase"])
        if rows:
            for phase in ("a", "b"):
                value = rows[-1].get(f"phase_{phase}_loss")
                if value is not None:
                    loss.add_metric([phase], float(value))
        yield loss

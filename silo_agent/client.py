"""The silo's connection to the coordinator: mutual TLS, deadlines, retries, chunked transfers.

Every call has a deadline. Calls that fail because the coordinator cannot be reached
(UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff and jitter (so silos that
lost the coordinator together do not return in lockstep) until it has been unreachable for
``give_up_after_s``; the protocol makes every call safe to repeat. A broken state download
resumes at the first chunk it lacks. Every other status is the coordinator's answer and goes to
the caller unchanged.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation import pki, tls, wire
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.proto_gen.condi.v1 import federation_pb2_grpc as pb_grpc
from federation.stages import StageKey
from federation.transfer import StateDownload, stage_ref, update_parts
from silo_agent.config import CoordinatorEndpoint, SiloTls

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_FIRST_BACKOFF_S = 0.5
# A transfer's deadline assumes at least this rate on top of the call timeout.
_SLOWEST_BYTES_PER_S = 1_000_000


class CoordinatorUnreachableError(ConnectionError):
    """The coordinator stayed unreachable for longer than the configured patience."""


def connect(endpoint: CoordinatorEndpoint, tls_cfg: SiloTls) -> grpc.Channel:
    """A mutual-TLS channel to the coordinator, after checking the silo's own certificate chain."""
    passphrase = pki.read_passphrase(tls_cfg.passphrase_file, tls_cfg.passphrase_env)
    credentials = tls.channel_credentials(tls_cfg.ca, tls_cfg.cert, tls_cfg.key, passphrase=passphrase)
    return tls.secure_channel(endpoint.address, credentials, server_name_override=endpoint.server_name)


def health_status(channel: grpc.Channel, timeout_s: float) -> str:
    """The coordinator's health-service answer for the federation service (e.g. ``SERVING``)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=tls.FEDERATION_SERVICE), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class CoordinatorClient:
    """Calls to the coordinator with deadlines and retries."""

    def __init__(
        self,
        endpoint: CoordinatorEndpoint,
        tls_cfg: SiloTls,
        silo_id: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.channel = connect(endpoint, tls_cfg)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.max_chunk_bytes = tls.DEFAULT_CHUNK_BYTES
        # Jitter differs between silos but is reproducible for one silo.
        self._rng = random.Random(silo_id)
        self._sleep = sleep

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.endpoint.max_backoff_s, _FIRST_BACKOFF_S * 2**attempt)
        return self._rng.uniform(cap / 2, cap)

    def retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, repeated while the coordinator is unreachable, up to ``give_up_after_s``."""
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                result = call()
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRYABLE:
                    raise
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure > self.endpoint.give_up_after_s:
                    raise CoordinatorUnreachableError(
                        f"{what}: coordinator at {self.endpoint.address} unreachable for "
                        f"{now - first_failure:.0f} s ({code.name}: {exc.details()})"
                    ) from exc
                delay = self._backoff(attempt)
                attempt += 1
                log.warning("%s failed (%s: %s); retrying in %.1f s", what, code.name, exc.details(), delay)
                self._sleep(delay)
                continue
            if attempt:
                log.info("%s: coordinator reachable again after %d retries", what, attempt)
            return result

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """The handshake."""
        reply = self.retrying("Join", lambda: self.stub.Join(request, timeout=self.endpoint.rpc_timeout_s))
        if reply.accepted and reply.max_chunk_bytes:
            self.max_chunk_bytes = min(reply.max_chunk_bytes, tls.DEFAULT_CHUNK_BYTES)
        return reply

    def get_task(self, last: StageKey | None, wait_ms: int) -> pb.Task:
        """The current task, waiting up to ``wait_ms`` on the coordinator while it equals ``last``."""
        request = pb.TaskRequest(wait_ms=wait_ms)
        if last is not None:
            request.ref.CopyFrom(stage_ref(last))
        timeout = self.endpoint.rpc_timeout_s + wait_ms / 1000.0
        return self.retrying("GetTask", lambda: self.stub.GetTask(request, timeout=timeout))

    def heartbeat(self, key: StageKey | None, status: str, progress: float, *, timeout_s: float) -> None:
        """A best-effort sign of life; failures are only logged (the task calls will retry)."""
        request = pb.HeartbeatRequest(status=status, progress=max(0.0, min(1.0, progress)))
        if key is not None:
            request.ref.CopyFrom(stage_ref(key))
        try:
            self.stub.Heartbeat(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            log.debug("heartbeat failed (%s)", exc.code().name)

    def download_state(
        self, key: StageKey, sha256: str, max_payload_bytes: int
    ) -> tuple[wire.EncodedState, int]:
        """The global state ``sha256`` for task ``key``, checksummed; also the bytes received."""
        download = StateDownload(
            sha256, max_payload_bytes=max_payload_bytes, max_chunk_bytes=self.max_chunk_bytes
        )
        timeout = self.endpoint.rpc_timeout_s + max_payload_bytes / _SLOWEST_BYTES_PER_S

        def attempt() -> wire.EncodedState:
            download.start_stream()
            request = pb.DownloadRequest(
                ref=stage_ref(key), state_sha256=sha256, first_chunk=download.next_chunk
            )
            for part in self.stub.DownloadState(request, timeout=timeout):
                download.feed(part)
            return download.result()

        encoded = self.retrying("DownloadState", attempt)
        return encoded, download.bytes_received

    def upload(self, header: pb.UpdateHeader, encoded: wire.EncodedState) -> pb.UploadReceipt:
        """Stream an update (header, then chunks); a retried upload is answered as a duplicate."""
        timeout = self.endpoint.rpc_timeout_s + encoded.manifest.payload_bytes / _SLOWEST_BYTES_PER_S
        return self.retrying(
            "UploadUpdate",
            lambda: self.stub.UploadUpdate(
                update_parts(header, encoded, self.max_chunk_bytes), timeout=timeout
            ),
        )

    def report_metrics(self, request: pb.MetricsReport) -> pb.Receipt:
        """Send evaluation metrics."""
        return self.retrying(
            "ReportMetrics", lambda: self.stub.ReportMetrics(request, timeout=self.endpoint.rpc_timeout_s)
        )

"""The gRPC face of the coordinator: read the caller from its certificate, call the coordinator, map errors.

Each handler is a few lines, and this is the one module of the coordinator that sees protobuf: a
request becomes a domain type of :mod:`federation.messages` (by :mod:`federation.serde`) before the
coordinator is called, and its reply becomes protobuf again; a request the protocol cannot mean is
refused in that conversion, as INVALID_ARGUMENT naming the field. The caller's silo id comes only
from :func:`federation.identity.identity_of` (the per-call certificate check of
:class:`~federation.identity.IdentityInterceptor`), never from a message field. A refusal is
aborted with the status the protocol prescribes and logged once, naming the silo, the call and
the reason; an unexpected error is logged with its traceback and answered with a bare INTERNAL.
Every call's outcome goes to the audit log (:mod:`federation.audit`) when one is given.
"""
# ruff: noqa: N802  (servicer methods carry the gRPC method names)

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

from coordinator.pooling import ReportError
from coordinator.rounds import ProtocolError
from coordinator.server import Coordinator
from federation import serde
from federation.audit import AuditLog, Outcome
from federation.identity import PeerIdentity, identity_of
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.proto_gen.condi.v1 import federation_pb2_grpc as pb_grpc
from federation.secagg import MessageError
from federation.transfer import TransferError, state_part

log = logging.getLogger(__name__)

METHOD_NAMES: tuple[str, ...] = tuple(pb.DESCRIPTOR.services_by_name["Federation"].methods_by_name)
"""The service's method names, as the audit log records them."""

T = TypeVar("T")

_CODES = {
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class FederationServicer(pb_grpc.FederationServicer):
    """Thin handlers over the :class:`~coordinator.server.Coordinator` of the run in progress.

    A long-lived service (:mod:`coordinator.service`) swaps :attr:`run` from one run to the next
    and leaves it None between runs, when every call is answered UNAVAILABLE.
    """

    def __init__(
        self, coordinator: Coordinator | None, *, max_calls_per_silo: int, audit: AuditLog | None = None
    ) -> None:
        self.run = coordinator
        # Calls each silo has in progress: one silo's flood of long polls must not occupy the
        # worker threads every other silo's heartbeats need.
        self.max_calls_per_silo = max_calls_per_silo
        self.audit = audit
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def coordinator(self) -> Coordinator:
        """The run in progress; a call that comes between runs is refused as UNAVAILABLE."""
        run = self.run
        if run is None:
            raise ProtocolError("unavailable", "no federation run in progress; ask again later")
        return run

    def register(self, server: grpc.Server) -> None:
        """Add this servicer to ``server``."""
        pb_grpc.add_FederationServicer_to_server(self, server)

    def _record(
        self, method: str, who: PeerIdentity, outcome: Outcome, code: grpc.StatusCode, reason: str = ""
    ) -> None:
        if self.audit is not None:
            self.audit.record(
                method=method,
                outcome=outcome,
                code=code.name,
                peer=who.peer,
                silo=who.silo_id,
                subject=who.subject,
                reason=reason,
            )

    def _refuse(
        self, context: grpc.ServicerContext, method: str, who: PeerIdentity, code: grpc.StatusCode, why: str
    ) -> NoReturn:
        log.warning("refused %s from silo %s (%s): %s", method, who.silo_id, code.name, why)
        self._record(method, who, "refused", code, why)
        context.abort(code, why)

    @contextlib.contextmanager
    def _slot(self, context: grpc.ServicerContext, method: str, who: PeerIdentity) -> Iterator[None]:
        silo = who.silo_id
        with self._lock:
            busy = self._in_flight.get(silo, 0)
            if busy < self.max_calls_per_silo:
                self._in_flight[silo] = busy + 1
        if busy >= self.max_calls_per_silo:
            self._refuse(
                context, method, who, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"silo {silo!r} already has {busy} calls in progress (max_calls_per_silo {self.max_calls_per_silo})",
            )
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[silo] -= 1

    def _call(self, context: grpc.ServicerContext, method: str, action: Callable[[str], T]) -> T:
        who = identity_of(context)
        with self._slot(context, method, who):
            result = self._act(context, method, who, action)
        self._record(method, who, "ok", grpc.StatusCode.OK)
        return result

    def _act(
        self, context: grpc.ServicerContext, method: str, who: PeerIdentity, action: Callable[[str], T]
    ) -> T:
        silo = who.silo_id
        try:
            return action(silo)
        except ProtocolError as exc:
            self._refuse(
                context, method, who, _CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), exc.message
            )
        except (TransferError, MessageError, ReportError) as exc:
            self._refuse(context, method, who, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            # The text of an unexpected error stays in the coordinator's log; the peer learns nothing.
            log.exception("%s from silo %s failed unexpectedly", method, silo)
            self._record(method, who, "error", grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error; the coordinator's log has the details")

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        def join(silo: str) -> pb.JoinReply:
            run = self.coordinator
            joining = serde.join_request_from_proto(request, run.cfg.layout_limits)
            return serde.join_reply_to_proto(run.join(silo, joining))

        return self._call(context, "Join", join)

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> pb.Task:
        return self._call(
            context,
            "GetTask",
            lambda silo: serde.task_to_proto(
                self.coordinator.get_task(silo, serde.task_request_from_proto(request))
            ),
        )

    def DownloadState(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StatePart]:
        # The state is converted part by part as the stream is read, as the coordinator yields it.
        yield from self._call(
            context,
            "DownloadState",
            lambda silo: map(
                state_part, self.coordinator.download(silo, serde.download_request_from_proto(request))
            ),
        )

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext
    ) -> pb.UploadReceipt:
        # Converted lazily: the coordinator admits the header before any chunk is read off the wire.
        return self._call(
            context,
            "UploadUpdate",
            lambda silo: serde.upload_receipt_to_proto(
                self.coordinator.submissions.upload(silo, serde.upload_from_proto(request_iterator))
            ),
        )

    def ReportMetrics(self, request: pb.MetricsReport, context: grpc.ServicerContext) -> pb.Receipt:
        return self._call(
            context,
            "ReportMetrics",
            lambda silo: serde.receipt_to_proto(
                self.coordinator.submissions.report_metrics(silo, serde.metrics_report_from_proto(request))
            ),
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        return self._call(
            context,
            "Heartbeat",
            lambda silo: serde.heartbeat_reply_to_proto(
                self.coordinator.heartbeat(silo, serde.heartbeat_request_from_proto(request))
            ),
        )

    def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context: grpc.ServicerContext) -> pb.Receipt:
        return self._call(
            context,
            "AdvertiseKeys",
            lambda silo: serde.receipt_to_proto(
                self.coordinator.submissions.advertise_keys(silo, serde.advertise_keys_request_from_proto(request))
            ),
        )

    def ShareKeys(self, request: pb.ShareKeysRequest, context: grpc.ServicerContext) -> pb.Receipt:
        return self._call(
            context,
            "ShareKeys",
            lambda silo: serde.receipt_to_proto(
                self.coordinator.submissions.share_keys(silo, serde.share_keys_request_from_proto(request))
            ),
        )

    def Unmask(self, request: pb.UnmaskRequest, context: grpc.ServicerContext) -> pb.Receipt:
        return self._call(
            context,
            "Unmask",
            lambda silo: serde.receipt_to_proto(
                self.coordinator.submissions.unmask(silo, serde.reveal_shares_request_from_proto(request))
            ),
        )

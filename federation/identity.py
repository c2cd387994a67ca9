"""Who is calling: a silo's identity from its client certificate, established on every gRPC call.

The TLS handshake (see :mod:`federation.tls`) already refuses clients without a certificate from
the federation CA. Each call then goes through :func:`peer_identity`, which re-checks the
certificate the connection presented against the CA, the current revocation list, the clock (a
connection may outlive its certificate) and the federation's allow-list. A refused call is
aborted with UNAUTHENTICATED (the certificate is not acceptable) or PERMISSION_DENIED (a valid
silo that is not in this federation), with a message naming the subject and the reason, and one
log line saying who and why. Message fields never decide who is speaking.

:class:`IdentityInterceptor` applies this to every RPC of a server, so servicer methods stay
thin and read the caller with :func:`identity_of`. :class:`RevocationList` re-reads the CA's CRL
when the file changes on disk, so a revocation takes effect on the next call without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
from cryptography import x509

from federation import pki
from federation.audit import AuditLog

log = logging.getLogger(__name__)

_PEM_KEY = "x509_pem_cert"


@dataclass(frozen=True)
class PeerIdentity:
    """The verified identity behind one call."""

    silo_id: str
    subject: str
    serial: int
    fingerprint_sha256: str
    not_valid_after: datetime
    peer: str
    certificate_pem: bytes


def _refuse(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    method: str,
    audit: AuditLog | None,
    subject: str | None = None,
) -> NoReturn:
    log.warning("refused %s from %s (%s): %s", method or "call", context.peer(), code.name, message)
    if audit is not None:
        audit.record(
            method=method or "call", outcome="refused", code=code.name, peer=context.peer(), subject=subject,
            reason=message,
        )
    context.abort(code, message)


def peer_identity(
    context: grpc.ServicerContext,
    *,
    ca_cert: x509.Certificate,
    revoked: Set[int],
    allow_list: Set[str],
    now: datetime | None = None,
    method: str = "",
    audit: AuditLog | None = None,
) -> PeerIdentity:
    """The silo identity of the caller of ``context``, or abort the call saying why not.

    ``now`` overrides the clock (tests); ``method`` names the call in the log line and in the
    refusal ``audit`` records.
    """
    pems = context.auth_context().get(_PEM_KEY)
    if not pems:
        _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate presented", method, audit)
    pem = pems[0]
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "the client certificate cannot be parsed", method, audit)
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    try:
        silo_id = pki.verify_peer_certificate(cert, ca_cert, revoked=revoked, now=now)
    except pki.CertificateRejected as exc:
        _refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc), method, audit, subject)
    if silo_id not in allow_list:
        _refuse(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"silo {silo_id!r} ({subject}) is not in this federation's allow-list",
            method,
            audit,
            subject,
        )
    return PeerIdentity(
        silo_id=silo_id,
        subject=subject,
        serial=cert.serial_number,
        fingerprint_sha256=pki.certificate_fingerprint(cert),
        not_valid_after=cert.not_valid_after_utc,
        peer=context.peer(),
        certificate_pem=pem,
    )


class RevocationList:
    """The serials revoked by the CA's CRL file, re-read whenever the file changes on disk.

    A replacement that cannot be used (missing, unreadable, not signed by the CA, or older: a
    lower CRLNumber than the list in force, which would un-revoke what was revoked since) is
    logged once and the last good list stays in force: it is still a valid statement of the CA,
    whereas dropping it would un-revoke every certificate on it.
    """

    def __init__(self, crl_path: str | os.PathLike[str], ca_cert: x509.Certificate) -> None:
        self.path = Path(crl_path)
        self._ca_cert = ca_cert
        self._lock = threading.Lock()
        self._seen = self._signature()
        self._current = pki.load_revocations(self.path, ca_cert)
        log.info(
            "revocation list %s (CRL number %d): %d revoked serials",
            self.path,
            self._current.number,
            len(self._current.serials),
        )

    def _signature(self) -> tuple[int, int, int, int] | None:
        # An atomic replace gives a new inode even when size and mtime happen to repeat.
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def serials(self) -> frozenset[int]:
        """The revoked serial numbers as of the file's current content."""
        signature = self._signature()
        with self._lock:
            current = self._current
            if signature == self._seen:
                return current.serials
            self._seen = signature
            if signature is None:
                log.error(
                    "revocation list %s is gone; keeping the last %d revoked serials",
                    self.path,
                    len(current.serials),
                )
                return current.serials
            try:
                loaded = pki.load_revocations(self.path, self._ca_cert)
            except pki.PkiError as exc:
                log.error(
                    "revocation list not reloaded, keeping the last %d revoked serials: %s",
                    len(current.serials),
                    exc,
                )
                return current.serials
            if loaded.number < current.number:
                log.error(
                    "revocation list %s has CRL number %d, older than the %d in force; keeping the %d "
                    "revoked serials of the newer list",
                    self.path,
                    loaded.number,
                    current.number,
                    len(current.serials),
                )
                return current.serials
            self._current = loaded
            log.info(
                "revocation list %s reloaded (CRL number %d): %d revoked serials",
                self.path,
                loaded.number,
                len(loaded.serials),
            )
            return loaded.serials


class _IdentifiedContext:
    """The servicer context of one call with the caller's verified identity attached."""

    def __init__(self, context: grpc.ServicerContext, identity: PeerIdentity) -> None:
        self._context = context
        self.peer_identity = identity

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def identity_of(context: Any) -> PeerIdentity:
    """The verified caller of a call that came through :class:`IdentityInterceptor`."""
    identity = getattr(context, "peer_identity", None)
    if not isinstance(identity, PeerIdentity):
        raise RuntimeError("no verified peer identity: the server was built without IdentityInterceptor")
    return identity


_HANDLER_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class IdentityInterceptor(grpc.ServerInterceptor):
    """Establishes the caller's identity before every RPC except the exempt ones.

    Handlers receive a context on which :func:`identity_of` returns the :class:`PeerIdentity`;
    refused calls never reach them. ``clock`` overrides the time used for validity checks (tests).
    """

    def __init__(
        self,
        ca_cert: x509.Certificate,
        revocations: RevocationList,
        allow_list: Iterable[str],
        *,
        clock: Callable[[], datetime] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        allowed = frozenset(allow_list)
        if not allowed:
            raise pki.PkiError("the allow-list is empty; every silo would be refused")
        for silo_id in sorted(allowed):
            pki.validate_silo_id(silo_id)
        self.ca_cert = ca_cert
        self.revocations = revocations
        self.allow_list = allowed
        self._clock = clock
        self.audit = audit

    def identify(self, context: grpc.ServicerContext, method: str = "") -> PeerIdentity:
        """The caller's identity under the current CRL and allow-list, or abort the call."""
        return peer_identity(
            context,
            ca_cert=self.ca_cert,
            revoked=self.revocations.serials(),
            allow_list=self.allow_list,
            now=self._clock() if self._clock is not None else None,
            method=method,
            audit=self.audit,
        )

    def _guard(self, behavior: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            identity = self.identify(context, method)
            return behavior(request, _IdentifiedContext(context, identity))

        return guarded

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's handler so that the identity check runs first."""
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        # Every service is guarded, the health service included: a revoked or off-list certificate
        # learns nothing, not even whether the coordinator is up.
        if handler is None:
            return handler
        for attr, factory in _HANDLER_KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return factory(
                    self._guard(behavior, method),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        raise TypeError(f"{method}: handler has no behavior")

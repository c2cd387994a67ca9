"""gRPC over mutual TLS for the federation: credentials, server and channel with shared options.

The coordinator serves with :func:`server_credentials` (client certificates required and checked
against the federation CA during the handshake) on :func:`secure_server`; a silo dials with
:func:`channel_credentials` on :func:`secure_channel`, which checks the coordinator's certificate
against the same CA and its host name or IP address. gRPC's TLS stack negotiates TLS 1.2 or 1.3
only; the Python API has no switch for older versions, and a test shows they are refused.

Certificates and keys are checked before they reach gRPC so that a wrong file gives an error
naming it, not an opaque handshake failure later. Key bytes are handed to gRPC in memory and never
logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from federation import pki

log = logging.getLogger(__name__)

# Largest Chunk.data a sender puts in one message. Payloads are cut to this size, so one message
# of any stream carries at most one chunk plus a small envelope.
DEFAULT_CHUNK_BYTES = 1 << 20
# Receive and send limit for every message. Four chunks' worth leaves room for the envelope and
# for the largest unchunked messages (a task with a key roster of a few hundred silos).
MAX_MESSAGE_BYTES = 4 << 20
# The service name clients ask the health service about (besides "" for the whole server).
FEDERATION_SERVICE = "condi.v1.Federation"

# Client pings every 30 s keep idle long-poll connections through hospital NAT and firewalls and
# find a dead coordinator within 40 s. The server must allow pings at least that often or it
# closes the connection with "too many pings".
_CLIENT_KEEPALIVE_MS = 30_000
_CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
_SERVER_KEEPALIVE_MS = 60_000
_SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
_SERVER_MIN_CLIENT_PING_MS = 10_000


class TlsError(Exception):
    """TLS material or a server address that cannot be used; the message names the file or address."""


@dataclass(frozen=True)
class BoundServer:
    """A gRPC server with its secure port bound (not yet started) and the port it got."""

    server: grpc.Server
    port: int


def _load_pair(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], passphrase: bytes | None
) -> tuple[x509.Certificate, bytes, bytes]:
    """A certificate, its PEM and its private key as unencrypted PEM, checked to belong together."""
    try:
        cert = pki.load_certificate(cert_path)
        key = pki.load_private_key(key_path, passphrase)
    except pki.PkiError as exc:
        raise TlsError(str(exc)) from exc
    if key.public_key() != cert.public_key():
        raise TlsError(f"{key_path} is not the private key of {cert_path}")
    # gRPC cannot decrypt keys itself, so a passphrase-protected key is handed over decrypted in memory.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert, cert.public_bytes(serialization.Encoding.PEM), key_pem


def _load_ca(ca_cert: str | os.PathLike[str]) -> tuple[x509.Certificate, bytes]:
    try:
        cert = pki.load_certificate(ca_cert)
    except pki.PkiError as exc:
        raise TlsError(str(exc)) from exc
    return cert, cert.public_bytes(serialization.Encoding.PEM)


def server_credentials(
    server_cert: str | os.PathLike[str],
    server_key: str | os.PathLike[str],
    ca_cert: str | os.PathLike[str],
) -> grpc.ServerCredentials:
    """Credentials for the coordinator: its certificate, and client certificates required from ``ca_cert``.

    The handshake already refuses clients without a certificate, with one from another CA, an
    expired one or one without clientAuth; revocation and the allow-list are checked per call by
    :mod:`federation.identity`.
    """
    cert, cert_pem, key_pem = _load_pair(server_cert, server_key, None)
    ca, ca_pem = _load_ca(ca_cert)
    problem = pki.server_certificate_problem(cert, ca)
    if problem is not None:
        raise TlsError(f"{server_cert}: {problem}; silos would refuse it")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(
    ca_cert: str | os.PathLike[str],
    client_cert: str | os.PathLike[str],
    client_key: str | os.PathLike[str],
    *,
    passphrase: bytes | None = None,
) -> grpc.ChannelCredentials:
    """Credentials for a silo: its certificate and key, and the CA that must have issued the coordinator's.

    The silo's own chain is checked first (key matches, issued by the CA, within its validity,
    clientAuth, silo id), so an expired or foreign certificate is reported here by name instead
    of as a closed socket after the coordinator refuses the handshake.
    """
    try:
        report = pki.check_chain(client_cert, client_key, ca_cert, passphrase=passphrase)
    except pki.PkiError as exc:
        raise TlsError(str(exc)) from exc
    if report.problems:
        raise TlsError("; ".join(report.problems))
    for warning in report.warnings:
        log.warning("%s", warning)
    _, cert_pem, key_pem = _load_pair(client_cert, client_key, passphrase)
    _, ca_pem = _load_ca(ca_cert)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def _message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes < DEFAULT_CHUNK_BYTES:
        raise TlsError(f"max_message_bytes {max_message_bytes} is below the chunk size {DEFAULT_CHUNK_BYTES}")
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel arguments of the coordinator's server."""
    return [
        *_message_options(max_message_bytes),
        ("grpc.keepalive_time_ms", _SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", _SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _SERVER_MIN_CLIENT_PING_MS),
        ("grpc.http2.max_ping_strikes", 2),
        # gRPC sets SO_REUSEPORT by default, which would let a second coordinator bind the same
        # port and silently take half of the connections.
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel arguments of a silo's channel."""
    return [
        *_message_options(max_message_bytes),
        ("grpc.keepalive_time_ms", _CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", _CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def secure_server(
    address: str,
    credentials: grpc.ServerCredentials,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_workers: int = 16,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_concurrent_rpcs: int | None = None,
) -> BoundServer:
    """A gRPC server with only a TLS port, bound at ``address`` (``host:0`` picks a free port).

    Add servicers, then call ``start()``; ``max_workers`` bounds concurrent calls, long polls
    included; beyond ``max_concurrent_rpcs`` calls are refused (RESOURCE_EXHAUSTED) instead of queued.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="condi-grpc"),
        interceptors=list(interceptors),
        options=server_options(max_message_bytes),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        server.stop(None)
        raise TlsError(f"cannot bind the coordinator to {address} ({exc})") from exc
    if port == 0:
        server.stop(None)
        raise TlsError(f"cannot bind the coordinator to {address} (address in use or not local?)")
    log.info("coordinator bound to %s (port %d, mutual TLS)", address, port)
    return BoundServer(server=server, port=port)


def secure_channel(
    target: str,
    credentials: grpc.ChannelCredentials,
    *,
    server_name_override: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A channel to the coordinator at ``target`` (``host:port``).

    The coordinator's certificate must name ``target``'s host in a DNS or IP SAN; with
    ``server_name_override`` it must name that instead (for a coordinator reached through an
    address its certificate does not list, such as an SSH tunnel).
    """
    options: list[tuple[str, int | str]] = list(channel_options(max_message_bytes))
    if server_name_override is not None:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return grpc.secure_channel(target, credentials, options=options)


def add_health_service(
    server: grpc.Server, services: Sequence[str] = (FEDERATION_SERVICE,)
) -> health.HealthServicer:
    """Register the standard gRPC health service, reporting SERVING for the server and ``services``.

    The returned servicer lets the caller report NOT_SERVING (e.g. while shutting down).
    """
    servicer = health.HealthServicer()
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer

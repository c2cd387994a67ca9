"""Mutual TLS and per-call peer identity with real gRPC servers on loopback and real certificates."""
# ruff: noqa: N802  (servicer methods carry the gRPC method names)

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import ssl
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation import identity, pki, tls, wire
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.proto_gen.condi.v1 import federation_pb2_grpc as pb_grpc

TIMEOUT_S = 5
ALLOWED = ("silo-1", "silo-2", "silo-revoked", "silo-late")
REF = pb.StageRef(run_id="run-a", round=3, attempt=1, stage=pb.STAGE_TRAIN)


@dataclass(frozen=True)
class Material:
    """The federation's PKI, a foreign one, and a certificate that expired before the tests ran."""

    main: pki.DevPki
    other: pki.DevPki
    expired_key: Path
    expired_cert: Path


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    root = tmp_path_factory.mktemp("pki")
    main = pki.dev_pki(root / "main", 4, silo_ids=["silo-1", "silo-2", "silo-outsider", "silo-revoked"])
    pki.revoke(main.ca.cert.parent, main.silos["silo-revoked"].cert)
    other = pki.dev_pki(root / "other", 1, silo_ids=["silo-1"])
    req = pki.make_request(root / "late", "silo-late")
    cert = pki.sign_request(
        req.csr,
        main.ca.cert.parent,
        root / "late" / "silo-late.crt",
        days=1,
        now=datetime.now(UTC) - timedelta(days=10),
    )
    return Material(main=main, other=other, expired_key=req.key, expired_cert=cert)


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    # About 2.4 MiB: three chunks of the default size, so streams carry several full messages.
    return {"theta": rng.standard_normal(600_000).astype(np.float32), "w": np.arange(12, dtype=np.int64)}


class RecordingServicer(pb_grpc.FederationServicer):
    """A test servicer that records who the server believes made each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, identity.PeerIdentity, Any]] = []
        self.encoded = wire.encode_state(_state())

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        who = identity.identity_of(context)
        self.calls.append(("Heartbeat", who, request))
        return pb.HeartbeatReply(silo_id=who.silo_id, current=request.ref)

    def ShareKeys(self, request: pb.ShareKeysRequest, context: grpc.ServicerContext) -> pb.Receipt:
        self.calls.append(("ShareKeys", identity.identity_of(context), request))
        return pb.Receipt(ref=request.ref)

    def DownloadState(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StatePart]:
        self.calls.append(("DownloadState", identity.identity_of(context), request))
        yield pb.StatePart(manifest_json=self.encoded.manifest.to_json())
        for piece in wire.chunk(self.encoded, tls.DEFAULT_CHUNK_BYTES)[request.first_chunk :]:
            yield pb.StatePart(
                chunk=pb.Chunk(
                    index=piece.index,
                    total=piece.total,
                    data=piece.data,
                    sha256=piece.sha256,
                    payload_sha256=piece.payload_sha256,
                )
            )

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext
    ) -> pb.UploadReceipt:
        who = identity.identity_of(context)
        header = next(request_iterator).header
        manifest = wire.Manifest.from_json(header.manifest_json)
        assembler = wire.Reassembler(max_payload_bytes=manifest.payload_bytes)
        for part in request_iterator:
            c = part.chunk
            assembler.add(wire.Chunk(c.index, c.total, c.data, c.sha256, c.payload_sha256))
        payload = assembler.payload()
        self.calls.append(("UploadUpdate", who, header))
        return pb.UploadReceipt(ref=header.ref, payload_sha256=hashlib.sha256(payload).hexdigest())


@dataclass(frozen=True)
class Running:
    port: int
    servicer: RecordingServicer


@contextmanager
def _serve(
    main: pki.DevPki,
    *,
    allow: tuple[str, ...] = ALLOWED,
    clock: Callable[[], datetime] | None = None,
    with_identity: bool = True,
) -> Iterator[Running]:
    ca = pki.load_certificate(main.ca.cert)
    interceptors = []
    if with_identity:
        interceptors.append(
            identity.IdentityInterceptor(ca, identity.RevocationList(main.ca.crl, ca), allow, clock=clock)
        )
    creds = tls.server_credentials(main.server.cert, main.server.key, main.ca.cert)
    bound = tls.secure_server("127.0.0.1:0", creds, interceptors=interceptors, max_workers=4)
    servicer = RecordingServicer()
    pb_grpc.add_FederationServicer_to_server(servicer, bound.server)
    tls.add_health_service(bound.server)
    bound.server.start()
    try:
        yield Running(port=bound.port, servicer=servicer)
    finally:
        bound.server.stop(None)


@pytest.fixture(scope="module")
def running(material: Material) -> Iterator[Running]:
    with _serve(material.main) as r:
        yield r


def _silo_creds(material: Material | pki.DevPki, silo_id: str) -> grpc.ChannelCredentials:
    main = material.main if isinstance(material, Material) else material
    paths = main.silos[silo_id]
    return tls.channel_credentials(main.ca.cert, paths.cert, paths.key)


def _raw_creds(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """Credentials that skip the client-side checks, to show what the server itself refuses."""
    return grpc.ssl_channel_credentials(
        ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )


@contextmanager
def _channel(port: int, creds: grpc.ChannelCredentials, **kwargs: Any) -> Iterator[grpc.Channel]:
    channel = tls.secure_channel(f"127.0.0.1:{port}", creds, **kwargs)
    try:
        yield channel
    finally:
        channel.close()


def _heartbeat(port: int, creds: grpc.ChannelCredentials, **kwargs: Any) -> pb.HeartbeatReply:
    with _channel(port, creds, **kwargs) as channel:
        return pb_grpc.FederationStub(channel).Heartbeat(pb.HeartbeatRequest(ref=REF), timeout=TIMEOUT_S)


def _refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---------------------------------------------------------------------------------------------
# Who is speaking


@pytest.mark.parametrize("silo_id", ["silo-1", "silo-2"])
def test_valid_silo_is_identified_by_its_certificate(
    material: Material, running: Running, silo_id: str
) -> None:
    reply = _heartbeat(running.port, _silo_creds(material, silo_id))
    assert reply.silo_id == silo_id
    assert reply.current == REF
    method, who, _ = running.servicer.calls[-1]
    cert = pki.load_certificate(material.main.silos[silo_id].cert)
    assert (method, who.silo_id, who.serial) == ("Heartbeat", silo_id, cert.serial_number)
    assert who.subject == f"CN={silo_id}"
    assert who.peer.startswith("ipv4:127.0.0.1:")
    assert who.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert who.certificate_pem == material.main.silos[silo_id].cert.read_bytes()


def test_message_fields_never_decide_who_is_speaking(material: Material, running: Running) -> None:
    with _channel(running.port, _silo_creds(material, "silo-1")) as channel:
        stub = pb_grpc.FederationStub(channel)
        stub.Heartbeat(pb.HeartbeatRequest(ref=REF, status="I am silo-2"), timeout=TIMEOUT_S)
        stub.ShareKeys(
            pb.ShareKeysRequest(ref=REF, shares=[pb.OutgoingShare(recipient="silo-2", ciphertext=b"x")]),
            timeout=TIMEOUT_S,
        )
        header = pb.UpdateHeader(
            ref=REF,
            encoding=pb.UPDATE_ENCODING_PLAIN,
            manifest_json=wire.encode_state({}).manifest.to_json(),
            claims_json=json.dumps({"silo_id": "silo-2"}),
        )
        empty = wire.chunk(wire.encode_state({}), 16)[0]
        stub.UploadUpdate(
            iter(
                [
                    pb.UpdatePart(header=header),
                    pb.UpdatePart(
                        chunk=pb.Chunk(
                            index=0,
                            total=1,
                            data=b"",
                            sha256=empty.sha256,
                            payload_sha256=empty.payload_sha256,
                        )
                    ),
                ]
            ),
            timeout=TIMEOUT_S,
        )
    recorded = running.servicer.calls[-3:]
    assert [c[0] for c in recorded] == ["Heartbeat", "ShareKeys", "UploadUpdate"]
    assert {c[1].silo_id for c in recorded} == {"silo-1"}


def test_streams_carry_full_chunks_in_both_directions(material: Material, running: Running) -> None:
    expected = _state()
    with _channel(running.port, _silo_creds(material, "silo-2")) as channel:
        stub = pb_grpc.FederationStub(channel)
        parts = list(stub.DownloadState(pb.DownloadRequest(ref=REF), timeout=TIMEOUT_S))
        manifest = wire.Manifest.from_json(parts[0].manifest_json)
        assembler = wire.Reassembler(max_payload_bytes=manifest.payload_bytes)
        for part in parts[1:]:
            c = part.chunk
            assembler.add(wire.Chunk(c.index, c.total, c.data, c.sha256, c.payload_sha256))
        decoded = wire.decode_state(manifest, assembler.payload())
        assert len(parts) == 4 and max(len(p.chunk.data) for p in parts[1:]) == tls.DEFAULT_CHUNK_BYTES
        for name, value in expected.items():
            np.testing.assert_array_equal(decoded[name], value)

        encoded = wire.encode_state(expected)
        header = pb.UpdateHeader(
            ref=REF, encoding=pb.UPDATE_ENCODING_PLAIN, manifest_json=encoded.manifest.to_json()
        )
        chunks = [
            pb.UpdatePart(
                chunk=pb.Chunk(
                    index=c.index,
                    total=c.total,
                    data=c.data,
                    sha256=c.sha256,
                    payload_sha256=c.payload_sha256,
                )
            )
            for c in wire.chunk(encoded, tls.DEFAULT_CHUNK_BYTES)
        ]
        receipt = stub.UploadUpdate(iter([pb.UpdatePart(header=header), *chunks]), timeout=TIMEOUT_S)
    assert receipt.payload_sha256 == encoded.manifest.payload_sha256
    assert running.servicer.calls[-2][1].silo_id == running.servicer.calls[-1][1].silo_id == "silo-2"


def test_handlers_refuse_to_run_without_the_interceptor(material: Material) -> None:
    with _serve(material.main, with_identity=False) as r:
        error = _refusal(lambda: _heartbeat(r.port, _silo_creds(material, "silo-1")))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert r.servicer.calls == []


# ---------------------------------------------------------------------------------------------
# Refused at the handshake


def _assert_refused_at_handshake(
    material: Material, running: Running, creds: grpc.ChannelCredentials
) -> None:
    """The call fails before any handler runs, while a valid silo still gets through."""
    before = len(running.servicer.calls)
    error = _refusal(lambda: _heartbeat(running.port, creds))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert len(running.servicer.calls) == before
    assert _heartbeat(running.port, _silo_creds(material, "silo-1")).silo_id == "silo-1"


def test_no_client_certificate_fails_the_handshake(material: Material, running: Running) -> None:
    _assert_refused_at_handshake(material, running, _raw_creds(material.main.ca.cert))


def test_certificate_from_another_ca_fails_the_handshake(material: Material, running: Running) -> None:
    foreign = material.other.silos["silo-1"]
    _assert_refused_at_handshake(
        material, running, _raw_creds(material.main.ca.cert, foreign.cert, foreign.key)
    )


def test_expired_certificate_fails_the_handshake_and_the_silo_is_told_why(
    material: Material, running: Running
) -> None:
    creds = _raw_creds(material.main.ca.cert, material.expired_cert, material.expired_key)
    _assert_refused_at_handshake(material, running, creds)
    with pytest.raises(tls.TlsError, match=r"silo-late\.crt: expired on"):
        tls.channel_credentials(material.main.ca.cert, material.expired_cert, material.expired_key)


def test_server_certificate_used_as_client_certificate_fails_the_handshake(
    material: Material, running: Running
) -> None:
    server = material.main.server
    _assert_refused_at_handshake(
        material, running, _raw_creds(material.main.ca.cert, server.cert, server.key)
    )


def test_silo_refuses_a_coordinator_from_another_ca(material: Material, running: Running) -> None:
    silo = material.main.silos["silo-1"]
    _assert_refused_at_handshake(material, running, _raw_creds(material.other.ca.cert, silo.cert, silo.key))


def test_silo_checks_the_coordinator_name(material: Material, running: Running) -> None:
    creds = _silo_creds(material, "silo-1")
    assert _heartbeat(running.port, creds, server_name_override="localhost").silo_id == "silo-1"
    error = _refusal(lambda: _heartbeat(running.port, creds, server_name_override="coordinator.example.org"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("version", "accepted"),
    [(ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)],
)
def test_only_tls_1_2_and_later_are_accepted(
    material: Material, running: Running, version: ssl.TLSVersion, accepted: bool
) -> None:
    silo = material.main.silos["silo-1"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(material.main.ca.cert)
    ctx.load_cert_chain(silo.cert, silo.key)
    # Let this client offer old versions, so that a refusal can only come from the server.
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT_S) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            negotiated = conn.version()
    except ssl.SSLError as exc:
        if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "UNSUPPORTED_PROTOCOL" in str(exc):
            pytest.skip(f"this OpenSSL cannot offer {version.name}: {exc}")
        assert not accepted, f"{version.name} refused: {exc}"
    else:
        assert accepted, f"server accepted {negotiated}"
        assert negotiated == version.name.replace("_", ".")


# ---------------------------------------------------------------------------------------------
# Refused on the call


def test_revoked_certificate_is_refused_naming_revoked(
    material: Material, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="federation.identity"):
        error = _refusal(lambda: _heartbeat(running.port, _silo_creds(material, "silo-revoked")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "CN=silo-revoked" in error.details() and "revoked" in error.details()
    lines = [r.getMessage() for r in caplog.records if r.name == "federation.identity"]
    assert (
        len(lines) == 1 and "Heartbeat" in lines[0] and "silo-revoked" in lines[0] and "revoked" in lines[0]
    )
    assert all(c[1].silo_id != "silo-revoked" for c in running.servicer.calls)


def test_silo_outside_the_allow_list_is_refused_naming_it(
    material: Material, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="federation.identity"):
        error = _refusal(lambda: _heartbeat(running.port, _silo_creds(material, "silo-outsider")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'silo-outsider'" in error.details() and "allow-list" in error.details()
    assert any("silo-outsider" in r.getMessage() for r in caplog.records if r.name == "federation.identity")


def test_certificate_that_expires_during_a_connection_is_refused_on_the_next_call(material: Material) -> None:
    # The handshake checks the real time; the identity check runs 400 days later, past the
    # certificate's 365 days, as on a connection kept open across the expiry.
    later = datetime.now(UTC) + timedelta(days=400)
    with _serve(material.main, clock=lambda: later) as r:
        error = _refusal(lambda: _heartbeat(r.port, _silo_creds(material, "silo-1")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "CN=silo-1" in error.details() and "expired on" in error.details()
    assert r.servicer.calls == []


def test_revocation_takes_effect_without_restart(tmp_path: Path) -> None:
    main = pki.dev_pki(tmp_path / "pki", 2)
    with _serve(main, allow=("silo-1", "silo-2")) as r:
        assert _heartbeat(r.port, _silo_creds(main, "silo-1")).silo_id == "silo-1"
        pki.revoke(main.ca.cert.parent, main.silos["silo-1"].cert)
        error = _refusal(lambda: _heartbeat(r.port, _silo_creds(main, "silo-1")))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in error.details()
        assert _heartbeat(r.port, _silo_creds(main, "silo-2")).silo_id == "silo-2"


# ---------------------------------------------------------------------------------------------
# Health and limits


def test_health_service_answers_serving_over_mutual_tls(material: Material, running: Running) -> None:
    with _channel(running.port, _silo_creds(material, "silo-1")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", tls.FEDERATION_SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        unknown = _refusal(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT_S))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
    # A certificate of the CA that is off the allow-list, or revoked, is not answered (issue 13).
    refusals = {"silo-outsider": grpc.StatusCode.PERMISSION_DENIED, "silo-revoked": grpc.StatusCode.UNAUTHENTICATED}
    for silo_id, code in refusals.items():
        with _channel(running.port, _silo_creds(material, silo_id)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            refused = _refusal(lambda s=stub: s.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S))
            assert refused.code() == code, silo_id
    error = _refusal(
        lambda: health_pb2_grpc.HealthStub(
            tls.secure_channel(f"127.0.0.1:{running.port}", _raw_creds(material.main.ca.cert))
        ).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_messages_over_the_limit_are_refused_by_both_ends(material: Material, running: Running) -> None:
    big = pb.ShareKeysRequest(
        ref=REF, shares=[pb.OutgoingShare(recipient="silo-2", ciphertext=b"\0" * tls.MAX_MESSAGE_BYTES)]
    )
    with _channel(running.port, _silo_creds(material, "silo-1")) as channel:
        error = _refusal(lambda: pb_grpc.FederationStub(channel).ShareKeys(big, timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A client without the federation's options sends it; the server refuses to take it.
    plain = grpc.secure_channel(f"127.0.0.1:{running.port}", _silo_creds(material, "silo-1"))
    try:
        error = _refusal(lambda: pb_grpc.FederationStub(plain).ShareKeys(big, timeout=TIMEOUT_S))
    finally:
        plain.close()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_port_in_use_is_an_error(material: Material, running: Running) -> None:
    creds = tls.server_credentials(material.main.server.cert, material.main.server.key, material.main.ca.cert)
    with pytest.raises(tls.TlsError, match=f"127.0.0.1:{running.port}"):
        tls.secure_server(f"127.0.0.1:{running.port}", creds)


# ---------------------------------------------------------------------------------------------
# Credentials and revocation files


def test_passphrase_protected_silo_key_connects(material: Material, running: Running, tmp_path: Path) -> None:
    req = pki.make_request(tmp_path, "silo-2", passphrase=b"correct horse")
    cert = pki.sign_request(req.csr, material.main.ca.cert.parent, tmp_path / "silo-2.crt")
    with pytest.raises(tls.TlsError, match="passphrase"):
        tls.channel_credentials(material.main.ca.cert, cert, req.key)
    creds = tls.channel_credentials(material.main.ca.cert, cert, req.key, passphrase=b"correct horse")
    assert _heartbeat(running.port, creds).silo_id == "silo-2"


def test_credentials_refuse_mismatched_or_foreign_material(material: Material) -> None:
    main, other = material.main, material.other
    with pytest.raises(tls.TlsError, match=r"silo-1\.key is not the private key of .*server\.crt"):
        tls.server_credentials(main.server.cert, main.silos["silo-1"].key, main.ca.cert)
    with pytest.raises(tls.TlsError, match=r"server\.crt: not issued by this CA \(CN=CondI dev CA\)"):
        tls.server_credentials(other.server.cert, other.server.key, main.ca.cert)
    with pytest.raises(tls.TlsError, match=r"silo-1\.crt: no serverAuth extended key usage"):
        tls.server_credentials(main.silos["silo-1"].cert, main.silos["silo-1"].key, main.ca.cert)
    with pytest.raises(tls.TlsError, match="was not issued by the CA"):
        tls.channel_credentials(main.ca.cert, other.silos["silo-1"].cert, other.silos["silo-1"].key)
    with pytest.raises(tls.TlsError, match=r"missing\.pem: certificate not found"):
        tls.channel_credentials(main.ca.cert, main.ca.cert.parent / "missing.pem", main.silos["silo-1"].key)


def test_revocation_list_keeps_the_last_good_list(
    material: Material, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main = material.main
    crl = tmp_path / "crl.pem"
    shutil.copy(main.ca.crl, crl)
    ca = pki.load_certificate(main.ca.cert)
    revoked_serial = pki.load_certificate(main.silos["silo-revoked"].cert).serial_number
    revocations = identity.RevocationList(crl, ca)
    assert revocations.serials() == {revoked_serial}
    with caplog.at_level(logging.ERROR, logger="federation.identity"):
        shutil.copy(material.other.ca.crl, crl)
        assert revocations.serials() == {revoked_serial}
        assert revocations.serials() == {revoked_serial}
        crl.unlink()
        assert revocations.serials() == {revoked_serial}
    # Other tests may leave the logger at INFO; only the errors are this test's business.
    messages = [
        r.getMessage() for r in caplog.records if r.name == "federation.identity" and r.levelno >= logging.ERROR
    ]
    assert len(messages) == 2 and "not reloaded" in messages[0] and "gone" in messages[1]


def test_an_older_crl_of_the_same_ca_does_not_un_revoke(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = pki.dev_pki(tmp_path / "pki", 2)
    ca = pki.load_certificate(dev.ca.cert)
    older = tmp_path / "older-crl.pem"
    shutil.copy(dev.ca.crl, older)
    pki.revoke(dev.ca.key.parent, dev.silos["silo-1"].cert)
    serial = pki.load_certificate(dev.silos["silo-1"].cert).serial_number
    newer = pki.load_revocations(dev.ca.crl, ca)
    assert newer.serials == {serial} and newer.number > pki.load_revocations(older, ca).number
    revocations = identity.RevocationList(dev.ca.crl, ca)
    shutil.copy(dev.ca.crl, tmp_path / "kept.pem")
    with caplog.at_level(logging.ERROR, logger="federation.identity"):
        # Signed by the same CA, so only its CRL number tells it apart: it is refused.
        shutil.copy(older, dev.ca.crl)
        assert revocations.serials() == {serial}
    messages = [r.getMessage() for r in caplog.records if r.name == "federation.identity"]
    assert any("older than the" in m and "keeping the 1 revoked serials" in m for m in messages), messages
    # The CA's next list (revoking silo-2 as well) is taken.
    shutil.copy(tmp_path / "kept.pem", dev.ca.crl)
    pki.revoke(dev.ca.key.parent, dev.silos["silo-2"].cert)
    assert len(revocations.serials()) == 2


def test_interceptor_fails_closed_on_a_plaintext_port(material: Material) -> None:
    ca = pki.load_certificate(material.main.ca.cert)
    interceptor = identity.IdentityInterceptor(ca, identity.RevocationList(material.main.ca.crl, ca), ALLOWED)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[interceptor])
    servicer = RecordingServicer()
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FederationStub(channel)
            error = _refusal(lambda: stub.Heartbeat(pb.HeartbeatRequest(ref=REF), timeout=TIMEOUT_S))
    finally:
        server.stop(None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "no client certificate presented"
    assert servicer.calls == []


def test_interceptor_refuses_a_bad_allow_list(material: Material) -> None:
    ca = pki.load_certificate(material.main.ca.cert)
    revocations = identity.RevocationList(material.main.ca.crl, ca)
    with pytest.raises(pki.PkiError, match="empty"):
        identity.IdentityInterceptor(ca, revocations, [])
    with pytest.raises(pki.PkiError, match="Silo_1"):
        identity.IdentityInterceptor(ca, revocations, ["silo-1", "Silo_1"])

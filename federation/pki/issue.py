"""Issuing: the operator's CA, hospitals' keys and requests, silo and coordinator certificates.

Everything is EC P-256 with SHA-256 signatures. The operator runs :func:`init_ca` once; each
hospital runs :func:`make_request` so its private key never leaves the site, sends the CSR, and
gets back a clientAuth certificate from :func:`sign_request` whose SAN URI ``condi://silo/<id>``
is the silo's identity. :func:`issue_server_cert` makes the coordinator's serverAuth certificate;
:func:`dev_pki` runs all of it for a throwaway harness PKI.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.pki.clock import CLOCK_SKEW, check_days, now_utc
from federation.pki.crl import DEFAULT_CRL_DAYS, write_crl
from federation.pki.extensions import authority_key_id, key_usage, subject_key_id
from federation.pki.store import (
    CaPaths,
    DevPki,
    PkiError,
    RequestPaths,
    ServerPaths,
    SiloPaths,
    load_ca,
    make_dir,
    read_file,
    refuse_overwrite,
    write_private_key,
    write_public,
)
from federation.pki.verify import SILO_URI_PREFIX, common_name_of, silo_uris, validate_silo_id

log = logging.getLogger(__name__)

_HOSTNAME_PATTERN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cn(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _silo_san(silo_id: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SILO_URI_PREFIX + silo_id)])


# ---------------------------------------------------------------------------------------------
# Operator: CA


def init_ca(
    out_dir: str | os.PathLike[str],
    *,
    common_name: str = "CondI Federation CA",
    days: int = 3650,
    passphrase: bytes | None = None,
    force: bool = False,
    now: datetime | None = None,
) -> CaPaths:
    """Create the federation CA in ``out_dir``: ca.key, self-signed ca.crt and an empty crl.pem.

    The CA may only sign end-entity certificates (path length 0). With ``passphrase`` the key is
    encrypted at rest; every later signing operation then needs it.
    """
    check_days(days, "CA validity")
    if not common_name or len(common_name) > 64:
        raise PkiError(f"CA common name must be 1-64 characters, got {common_name!r}")
    paths = CaPaths.in_dir(out_dir)
    refuse_overwrite([paths.key, paths.cert, paths.crl], force)
    make_dir(paths.key.parent)
    t0 = now_utc(now)
    key = _new_key()
    name = _cn(common_name)
    ski = subject_key_id(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t0 - CLOCK_SKEW)
        .not_valid_after(t0 + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_key(paths.key, key, passphrase)
    write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    write_crl(paths.crl, key, cert, [], crl_number=1, now=t0, next_update_days=DEFAULT_CRL_DAYS)
    log.info("created CA %r in %s (valid until %s)", common_name, paths.cert.parent, cert.not_valid_after_utc)
    return paths


def _validity(ca_cert: x509.Certificate, days: int, now: datetime | None, what: str) -> tuple[datetime, datetime]:
    """Validity window for an issued certificate, never extending past the CA's own expiry."""
    t0 = now_utc(now)
    not_after = t0 + timedelta(days=days)
    ca_end = ca_cert.not_valid_after_utc
    if t0 >= ca_end:
        raise PkiError(f"the CA certificate expired on {ca_end:%Y-%m-%d}; cannot issue {what}")
    if not_after > ca_end:
        log.warning("%s would outlive the CA; its validity is cut to %s", what, ca_end)
        not_after = ca_end
    return t0 - CLOCK_SKEW, not_after


def _leaf_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    validity: tuple[datetime, datetime],
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName,
) -> x509.Certificate:
    """An end-entity certificate signed by the CA for one extended key usage (clientAuth or serverAuth)."""
    not_before, not_after = validity
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(subject_key_id(public_key), critical=False)
        .add_extension(authority_key_id(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# ---------------------------------------------------------------------------------------------
# Hospital: key and request


def make_request(
    out_dir: str | os.PathLike[str],
    silo_id: str,
    *,
    passphrase: bytes | None = None,
    force: bool = False,
) -> RequestPaths:
    """Make a silo key pair and CSR in ``out_dir``: ``<silo_id>.key`` (stays here) and ``<silo_id>.csr``.

    The CSR carries CN=silo_id and the SAN URI ``condi://silo/<silo_id>``, which the CA copies into
    the certificate as the silo's identity.
    """
    validate_silo_id(silo_id)
    root = Path(out_dir)
    paths = RequestPaths(key=root / f"{silo_id}.key", csr=root / f"{silo_id}.csr")
    refuse_overwrite([paths.key, paths.csr], force)
    make_dir(root)
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_cn(silo_id))
        .add_extension(_silo_san(silo_id), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_key(paths.key, key, passphrase)
    write_public(paths.csr, csr.public_bytes(serialization.Encoding.PEM))
    log.info("created key and request for silo %s in %s", silo_id, root)
    return paths


def _silo_id_from_csr(csr: x509.CertificateSigningRequest, source: Path) -> str:
    uris = silo_uris(csr.extensions)
    if uris is None:
        raise PkiError(f"{source}: request has no subjectAltName; expected one URI {SILO_URI_PREFIX}<id>")
    if len(uris) != 1:
        raise PkiError(f"{source}: request has {len(uris)} SAN URIs; expected exactly one {SILO_URI_PREFIX}<id>")
    if not uris[0].startswith(SILO_URI_PREFIX):
        raise PkiError(f"{source}: SAN URI {uris[0]!r} does not start with {SILO_URI_PREFIX}")
    try:
        silo_id = validate_silo_id(uris[0][len(SILO_URI_PREFIX) :])
    except PkiError as exc:
        raise PkiError(f"{source}: {exc}") from exc
    cn = common_name_of(csr.subject)
    if cn != silo_id:
        raise PkiError(f"{source}: common name {cn!r} does not match the SAN silo id {silo_id!r}")
    return silo_id


# ---------------------------------------------------------------------------------------------
# Operator: signing


def sign_request(
    csr_path: str | os.PathLike[str],
    ca_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    days: int = 365,
    ca_passphrase: bytes | None = None,
    expected_silo_id: str | None = None,
    force: bool = False,
    now: datetime | None = None,
) -> Path:
    """Check a silo CSR and issue its clientAuth certificate to ``out_path``.

    The request must be validly self-signed by a P-256 key and name exactly one silo (one SAN URI
    ``condi://silo/<id>``, equal to the CN). ``expected_silo_id`` guards against signing a request
    for a different hospital than the operator meant. ``now`` overrides the clock (tests).
    """
    check_days(days, "certificate validity")
    src = Path(csr_path)
    out = Path(out_path)
    try:
        csr = x509.load_pem_x509_csr(read_file(src, "certificate request"))
    except ValueError as exc:
        raise PkiError(f"{src}: not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise PkiError(f"{src}: request signature is invalid")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise PkiError(f"{src}: request key is not EC P-256")
    silo_id = _silo_id_from_csr(csr, src)
    if expected_silo_id is not None and silo_id != expected_silo_id:
        raise PkiError(f"{src}: request is for silo {silo_id!r}, expected {expected_silo_id!r}")
    refuse_overwrite([out], force)
    ca_key, ca_cert = load_ca(ca_dir, ca_passphrase)
    validity = _validity(ca_cert, days, now, f"certificate for silo {silo_id}")
    cert = _leaf_certificate(
        ca_key,
        ca_cert,
        subject=_cn(silo_id),
        public_key=public_key,
        validity=validity,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        san=_silo_san(silo_id),
    )
    make_dir(out.parent)
    write_public(out, cert.public_bytes(serialization.Encoding.PEM))
    log.info("issued certificate for silo %s, serial %x, valid until %s", silo_id, cert.serial_number, validity[1])
    return out


def _validate_server_names(hostnames: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        norm = host.lower().rstrip(".")
        if not _HOSTNAME_PATTERN.fullmatch(norm):
            raise PkiError(f"invalid server hostname {host!r}: expected DNS labels of a-z, 0-9 and '-'")
        names.append(x509.DNSName(norm))
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PkiError(f"invalid server IP address {ip!r}") from exc
    if not names:
        raise PkiError("a server certificate needs at least one hostname or IP address")
    return names


def issue_server_cert(
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hostnames: Sequence[str],
    ips: Sequence[str],
    days: int = 365,
    ca_passphrase: bytes | None = None,
    force: bool = False,
    now: datetime | None = None,
) -> ServerPaths:
    """Issue the coordinator's serverAuth certificate (DNS and IP SANs) with its key beside it.

    The server key is written unencrypted (mode 0600) because the gRPC server reads it at start
    without an operator present.
    """
    check_days(days, "certificate validity")
    san = _validate_server_names(hostnames, ips)
    root = Path(out_dir)
    paths = ServerPaths(key=root / "server.key", cert=root / "server.crt")
    refuse_overwrite([paths.key, paths.cert], force)
    ca_key, ca_cert = load_ca(ca_dir, ca_passphrase)
    validity = _validity(ca_cert, days, now, "server certificate")
    key = _new_key()
    first = str(san[0].value)
    cert = _leaf_certificate(
        ca_key,
        ca_cert,
        subject=_cn(first if len(first) <= 64 else "CondI coordinator"),
        public_key=key.public_key(),
        validity=validity,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=x509.SubjectAlternativeName(san),
    )
    make_dir(root)
    write_private_key(paths.key, key, None)
    write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    log.info("issued server certificate for %s in %s", ", ".join(str(n.value) for n in san), root)
    return paths


def dev_pki(
    out_dir: str | os.PathLike[str],
    n_silos: int,
    *,
    silo_ids: Sequence[str] | None = None,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    days: int = 365,
    force: bool = False,
) -> DevPki:
    """A throwaway PKI for the harness, made through the same steps as a real deployment.

    Layout: ``ca/`` (no passphrase), ``server/``, and ``silos/<id>/`` with each silo's key, CSR and
    certificate. Silo ids default to ``silo-1`` .. ``silo-N``.
    """
    if not isinstance(n_silos, int) or isinstance(n_silos, bool) or n_silos < 1:
        raise PkiError(f"number of silos must be a whole number >= 1, got {n_silos!r}")
    ids = list(silo_ids) if silo_ids is not None else [f"silo-{i}" for i in range(1, n_silos + 1)]
    if len(ids) != n_silos:
        raise PkiError(f"got {len(ids)} silo ids for {n_silos} silos")
    for sid in ids:
        validate_silo_id(sid)
    if len(set(ids)) != len(ids):
        raise PkiError(f"silo ids are not unique: {ids}")
    root = Path(out_dir)
    ca = init_ca(root / "ca", common_name="CondI dev CA", force=force)
    server = issue_server_cert(root / "ca", root / "server", hostnames=hostnames, ips=ips, days=days, force=force)
    silos: dict[str, SiloPaths] = {}
    for sid in ids:
        req = make_request(root / "silos" / sid, sid, force=force)
        cert = sign_request(
            req.csr, root / "ca", req.csr.with_suffix(".crt"), days=days, force=force, expected_silo_id=sid
        )
        silos[sid] = SiloPaths(key=req.key, csr=req.csr, cert=cert)
    return DevPki(root=root, ca=ca, server=server, silos=silos)

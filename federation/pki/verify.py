"""Whether a certificate may be used, and which silo it speaks for.

``cryptography.x509.verification`` decides the X.509 part with its web-PKI policy: a client
verifier for silo certificates, a server verifier for the coordinator's. It checks that the leaf
is signed by the federation CA, that both are within their validity periods at the given time,
that the CA has a critical basicConstraints (cA) and keyCertSign, that the leaf is not a CA, has
a subjectAltName and an authorityKeyIdentifier, and that an extended key usage, when present,
names clientAuth (silo) or serverAuth (coordinator) — so a server certificate is refused as a
client certificate and the other way round.

The rules that policy does not know stay here: the extended key usage must be present (the
policy lets a leaf without one serve any purpose), the CA's revocation list, and the silo id
from the SAN URI ``condi://silo/<id>``. A refusal is worded from the certificate (its dates, the
CA expected, the usage expected), because the library's messages say none of that and are not
a stable interface; the wording only explains a refusal and never accepts a certificate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Set
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, Subject, VerificationError

from federation.names import is_silo_id
from federation.pki.clock import now_utc
from federation.pki.store import PkiError, load_certificate, load_private_key, same_public_key

SILO_URI_PREFIX = "condi://silo/"


class CertificateRejected(PkiError):  # noqa: N818 - name fixed by the federation interface
    """A peer certificate that must not be accepted; ``reason`` says why in a few words."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"certificate {subject!r} rejected: {reason}")
        self.subject = subject
        self.reason = reason


@dataclass(frozen=True)
class ChainReport:
    """What ``silo-agent check`` learns about a certificate, its key and the CA."""

    cert_path: Path
    subject: str
    silo_id: str | None
    serial: int
    not_valid_after: datetime
    days_left: int
    key_matches: bool
    signed_by_ca: bool
    problems: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when nothing in the chain stops the silo from connecting."""
        return not self.problems


@dataclass(frozen=True)
class _Role:
    """Which end of a connection a certificate is checked for."""

    usage: x509.ObjectIdentifier
    usage_name: str
    holder: str


_SILO = _Role(ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth", "silo")
_COORDINATOR = _Role(ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth", "coordinator")
# What the library appends to every message: a repr of the certificate, which the caller names anyway.
_LIBRARY_SUFFIX = re.compile(r"\s*\(encountered processing <Certificate.*\)\s*$", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Names and identities


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of ``cert`` as lowercase hex: how silos pin each other out of band."""
    return cert.fingerprint(hashes.SHA256()).hex()


def validate_silo_id(silo_id: str) -> str:
    """Return ``silo_id`` when it is a valid silo id, else raise with the rule it breaks."""
    if not is_silo_id(silo_id):
        raise PkiError(
            f"invalid silo id {silo_id!r}: expected 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return silo_id


def subject_text(name: x509.Name) -> str:
    """``name`` as an RFC 4514 string for messages, ``(empty subject)`` when it has no attributes."""
    return name.rfc4514_string() or "(empty subject)"


def common_name_of(name: x509.Name) -> str | None:
    """The first common name in ``name``, or None."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def silo_uris(extensions: x509.Extensions) -> list[str] | None:
    """All URIs in the SAN extension, or None when there is no SAN extension."""
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def silo_id_from_certificate(cert: x509.Certificate) -> str:
    """The silo identity of a certificate: its SAN URI ``condi://silo/<id>``, else its CN."""
    subject = subject_text(cert.subject)
    uris = [u for u in (silo_uris(cert.extensions) or []) if u.startswith(SILO_URI_PREFIX)]
    if len(uris) > 1:
        raise CertificateRejected(subject, f"{len(uris)} {SILO_URI_PREFIX} URIs in the SAN, expected one")
    candidate = uris[0][len(SILO_URI_PREFIX) :] if uris else common_name_of(cert.subject)
    if candidate is None:
        raise CertificateRejected(subject, f"no {SILO_URI_PREFIX} SAN URI and no common name")
    try:
        return validate_silo_id(candidate)
    except PkiError as exc:
        raise CertificateRejected(subject, str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Verification


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``ca_cert``'s key signed ``cert`` (names match and the signature verifies); nothing else is checked."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _usage_problem(cert: x509.Certificate, role: _Role) -> str | None:
    """Why ``cert``'s extended key usage does not fit ``role`` (it must be present and name the role's usage)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return f"no extended key usage; {role.usage_name} is required"
    if role.usage not in usages:
        return f"no {role.usage_name} extended key usage"
    return None


def _validity_problem(cert: x509.Certificate, t: datetime) -> str | None:
    """Why ``t`` lies outside ``cert``'s validity period, with the date that decides it, or None."""
    if t < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if t > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _explain(cert: x509.Certificate, ca_cert: x509.Certificate, t: datetime, role: _Role) -> str | None:
    """What in ``cert`` makes it unfit for ``role``, in the federation's words, or None when nothing shows."""
    if not issued_by(cert, ca_cert):
        return f"not issued by this CA ({subject_text(ca_cert.subject)})"
    if (problem := _validity_problem(cert, t)) is not None:
        return problem
    if (problem := _validity_problem(ca_cert, t)) is not None:
        return f"the CA certificate is {problem}"
    if _is_ca(cert):
        return f"is a CA certificate, not a {role.holder} certificate"
    return _usage_problem(cert, role)


def _check(cert: x509.Certificate, ca_cert: x509.Certificate, t: datetime, server_name: Subject | None = None) -> None:
    """Raise :class:`CertificateRejected` unless ``cert`` is fit at ``t`` for its end of a connection.

    Without ``server_name`` it is checked as a silo's client certificate, with one as the
    coordinator's server certificate for that name. Revocation and the silo id are the callers'.
    """
    role = _SILO if server_name is None else _COORDINATOR
    builder = PolicyBuilder().store(Store([ca_cert])).time(t)
    try:
        if server_name is None:
            builder.build_client_verifier().verify(cert, [])
        else:
            builder.build_server_verifier(server_name).verify(cert, [])
    except (VerificationError, x509.UnsupportedGeneralNameType) as exc:
        reason = _explain(cert, ca_cert, t, role) or _LIBRARY_SUFFIX.sub("", str(exc))
        raise CertificateRejected(subject_text(cert.subject), reason) from exc
    problem = _usage_problem(cert, role)
    if problem is not None:
        raise CertificateRejected(subject_text(cert.subject), problem)


def verify_peer_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    revoked: Set[int],
    now: datetime | None = None,
) -> str:
    """Accept a silo's client certificate and return its silo id, or raise :class:`CertificateRejected`.

    Checks, in order: the library's client verification against this CA (chain, validity of both,
    not a CA, extensions, clientAuth when a usage is listed), an extended key usage with clientAuth,
    not revoked, a valid silo id.
    """
    _check(cert, ca_cert, now_utc(now))
    if cert.serial_number in revoked:
        raise CertificateRejected(subject_text(cert.subject), f"revoked (serial {cert.serial_number:x})")
    return silo_id_from_certificate(cert)


def _server_names(cert: x509.Certificate) -> list[Subject]:
    """The DNS names and IP addresses in ``cert``'s SAN: what a silo may dial to reach its holder."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name for name in san if isinstance(name, x509.DNSName | x509.IPAddress)]


def server_certificate_problem(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, now: datetime | None = None
) -> str | None:
    """Why silos would refuse ``cert`` as the coordinator's certificate, or None.

    The coordinator does not know which of its names a silo dials (gRPC checks that one during the
    handshake), so the certificate is verified for the first name the verifier can match: every
    other rule is the same for all of them.
    """
    t = now_utc(now)
    for name in _server_names(cert):
        try:
            _check(cert, ca_cert, t, name)
        except ValueError:
            # The verifier cannot be built for this name (a wildcard, or not a valid DNS name).
            continue
        except CertificateRejected as exc:
            return exc.reason
        return None
    return _explain(cert, ca_cert, t, _COORDINATOR) or (
        "no DNS name or IP address a silo could dial in its subjectAltName"
    )


def check_chain(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    ca_path: str | os.PathLike[str],
    *,
    passphrase: bytes | None = None,
    now: datetime | None = None,
    warn_days: int = 30,
) -> ChainReport:
    """Inspect a silo's certificate, key and CA certificate for ``silo-agent check``.

    Unreadable files raise :class:`PkiError`; everything else found wrong (key mismatch, foreign
    CA, expiry, missing clientAuth, bad silo id) is listed in the report's ``problems``.
    """
    cert = load_certificate(cert_path)
    ca_cert = load_certificate(ca_path)
    key = load_private_key(key_path, passphrase)
    t = now_utc(now)
    problems: list[str] = []
    warnings: list[str] = []
    key_matches = same_public_key(key.public_key(), cert.public_key())
    if not key_matches:
        problems.append(f"{key_path} is not the private key of {cert_path}")
    signed_by_ca = issued_by(cert, ca_cert)
    if not signed_by_ca:
        problems.append(f"{cert_path} was not issued by the CA in {ca_path}")
    else:
        try:
            _check(cert, ca_cert, t)
        except CertificateRejected as exc:
            problems.append(f"{cert_path}: {exc.reason}")
    silo_id: str | None = None
    try:
        silo_id = silo_id_from_certificate(cert)
    except CertificateRejected as exc:
        problems.append(f"{cert_path}: {exc.reason}")
    not_after = cert.not_valid_after_utc
    days_left = (not_after - t).days
    if 0 <= days_left < warn_days:
        warnings.append(f"{cert_path} expires in {days_left} days ({not_after:%Y-%m-%d}); request a new one")
    return ChainReport(
        cert_path=Path(cert_path),
        subject=subject_text(cert.subject),
        silo_id=silo_id,
        serial=cert.serial_number,
        not_valid_after=not_after,
        days_left=days_left,
        key_matches=key_matches,
        signed_by_ca=signed_by_ca,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )

"""Revocation: the CA-signed certificate revocation list, written by :func:`revoke` and read at runtime.

Each CRL carries a CRLNumber one above the list it replaces. A reader that already holds a list
refuses one with a lower number (see :class:`federation.identity.RevocationList`), since an older
list would un-revoke what was revoked since; :class:`Revocations` gives it the number to compare.
A CRL not signed by the CA is an error, never an empty list.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.pki.clock import check_days, now_utc
from federation.pki.extensions import authority_key_id
from federation.pki.store import CaPaths, PkiError, load_ca, load_certificate, read_file, write_public
from federation.pki.verify import issued_by, subject_text

log = logging.getLogger(__name__)

DEFAULT_CRL_DAYS = 90


@dataclass(frozen=True)
class Revocations:
    """What one CA-signed CRL says: its CRLNumber (-1 when it has none) and the revoked serials."""

    number: int
    serials: frozenset[int]


def write_crl(
    path: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
    *,
    crl_number: int,
    now: datetime,
    next_update_days: int,
) -> None:
    """Sign a CRL listing ``revoked`` with the CA key and write it to ``path``, replacing what is there."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(authority_key_id(ca_cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    write_public(path, crl.public_bytes(serialization.Encoding.PEM))


def _load_crl(crl_path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(read_file(crl_path, "revocation list"))
    except ValueError as exc:
        raise PkiError(f"{crl_path}: not a PEM certificate revocation list") from exc
    if crl.issuer != ca_cert.subject:
        raise PkiError(f"{crl_path}: revocation list was issued by {subject_text(crl.issuer)}, not by this CA")
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise PkiError(f"{crl_path}: revocation list signature does not verify against the CA; refusing it")
    return crl


def load_revocations(
    crl_path: str | os.PathLike[str], ca_cert: x509.Certificate, *, now: datetime | None = None
) -> Revocations:
    """The CA-signed CRL at ``crl_path``; a forged CRL is an error.

    A CRL past its next-update time is still used (it can only lack newer revocations, and the
    operator who writes it also runs the coordinator) but logged as stale.
    """
    path = Path(crl_path)
    crl = _load_crl(path, ca_cert)
    next_update = crl.next_update_utc
    if next_update is not None and now_utc(now) > next_update:
        log.warning("revocation list %s is stale (next update was due %s)", path, next_update)
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = -1
    return Revocations(number=number, serials=frozenset(entry.serial_number for entry in crl))


def load_revoked_serials(
    crl_path: str | os.PathLike[str], ca_cert: x509.Certificate, *, now: datetime | None = None
) -> set[int]:
    """Serial numbers revoked by the CA-signed CRL at ``crl_path`` (see :func:`load_revocations`)."""
    return set(load_revocations(crl_path, ca_cert, now=now).serials)


def revoke(
    ca_dir: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified,
    ca_passphrase: bytes | None = None,
    next_update_days: int = DEFAULT_CRL_DAYS,
    now: datetime | None = None,
) -> Path:
    """Add the certificate at ``cert_path`` to the CA's CRL (``crl.pem`` in ``ca_dir``) and re-sign it.

    Revoking an already revoked certificate leaves the CRL as it is. Returns the CRL path.
    """
    check_days(next_update_days, "CRL next-update interval")
    if reason == x509.ReasonFlags.remove_from_crl:
        raise PkiError("reason remove_from_crl only applies to delta CRLs")
    paths = CaPaths.in_dir(ca_dir)
    ca_key, ca_cert = load_ca(ca_dir, ca_passphrase)
    target = load_certificate(cert_path)
    # Only the issuer matters here: an expired or otherwise unusable certificate may still be revoked.
    if not issued_by(target, ca_cert):
        raise PkiError(f"{cert_path}: certificate was not issued by the CA in {ca_dir}")
    entries: list[x509.RevokedCertificate] = []
    crl_number = 1
    if paths.crl.exists():
        old = _load_crl(paths.crl, ca_cert)
        if old.get_revoked_certificate_by_serial_number(target.serial_number) is not None:
            log.info("certificate %s (serial %x) is already revoked", cert_path, target.serial_number)
            return paths.crl
        entries = list(old)
        with contextlib.suppress(x509.ExtensionNotFound):
            crl_number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    t0 = now_utc(now)
    entry = x509.RevokedCertificateBuilder().serial_number(target.serial_number).revocation_date(t0)
    # RFC 5280: the reason code "unspecified" should be expressed by omitting the extension.
    if reason != x509.ReasonFlags.unspecified:
        entry = entry.add_extension(x509.CRLReason(reason), critical=False)
    entries.append(entry.build())
    write_crl(paths.crl, ca_key, ca_cert, entries, crl_number=crl_number, now=t0, next_update_days=next_update_days)
    log.info(
        "revoked certificate %s (serial %x); CRL %s now lists %d",
        subject_text(target.subject),
        target.serial_number,
        paths.crl,
        len(entries),
    )
    return paths.crl

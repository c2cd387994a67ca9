"""The federation's X.509 PKI: an operator CA, hospital-kept silo keys, server certs, revocation.

Everything is EC P-256 with SHA-256 signatures, built with ``cryptography``. The operator runs
:func:`init_ca` once; each hospital runs :func:`make_request` so its private key never leaves the
site, sends the CSR, and gets back a clientAuth certificate from :func:`sign_request` whose SAN
URI ``condi://silo/<id>`` is the silo's identity. :func:`issue_server_cert` makes the
coordinator's serverAuth certificate; :func:`revoke` maintains a CA-signed CRL. At runtime the
coordinator calls :func:`verify_peer_certificate` on every client certificate and a silo calls
:func:`check_chain` before it connects.

Key files are written atomically with mode 0600; nothing in this module logs key material or
passphrases.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

SILO_URI_PREFIX = "condi://silo/"
SILO_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HOSTNAME_PATTERN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)

# Tolerate small clock differences between the CA host and the peers that check its certificates.
_CLOCK_SKEW = timedelta(minutes=5)
_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700
_DEFAULT_CRL_DAYS = 90


class PkiError(Exception):
    """A PKI operation that cannot be done; the message names the file or value and what is wrong."""


class CertificateRejected(PkiError):  # noqa: N818 - name fixed by the federation interface
    """A peer certificate that must not be accepted; ``reason`` says why in a few words."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"certificate {subject!r} rejected: {reason}")
        self.subject = subject
        self.reason = reason


@dataclass(frozen=True)
class CaPaths:
    """Where a CA keeps its key, certificate and revocation list."""

    key: Path
    cert: Path
    crl: Path

    @classmethod
    def in_dir(cls, ca_dir: str | os.PathLike[str]) -> CaPaths:
        """The fixed file names inside a CA directory."""
        root = Path(ca_dir)
        return cls(key=root / "ca.key", cert=root / "ca.crt", crl=root / "crl.pem")


@dataclass(frozen=True)
class RequestPaths:
    """A hospital's private key (stays on site) and the CSR that goes to the operator."""

    key: Path
    csr: Path


@dataclass(frozen=True)
class ServerPaths:
    """The coordinator's serverAuth key and certificate."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class SiloPaths:
    """One silo's key, request and signed certificate, as laid out by :func:`dev_pki`."""

    key: Path
    csr: Path
    cert: Path


@dataclass(frozen=True)
class DevPki:
    """A throwaway PKI for the harness: CA, coordinator certificate and one identity per silo."""

    root: Path
    ca: CaPaths
    server: ServerPaths
    silos: dict[str, SiloPaths]

    def coordinator_tls(self) -> dict[str, str]:
        """The ``tls:`` section of a federation.yaml served with this PKI."""
        return {
            "ca": str(self.ca.cert),
            "cert": str(self.server.cert),
            "key": str(self.server.key),
            "crl": str(self.ca.crl),
        }


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


# ---------------------------------------------------------------------------------------------
# Files


def read_passphrase(file: str | os.PathLike[str] | None = None, env: str | None = None) -> bytes | None:
    """A key passphrase from a file or an environment variable, or ``None`` when neither is given.

    Passphrases never come from YAML or the command line, where they would be visible to others.
    One trailing newline in the file is dropped so ``echo secret > file`` works.
    """
    if file is not None and env is not None:
        raise PkiError("give the passphrase either as a file or as an environment variable, not both")
    if file is not None:
        path = Path(file)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise PkiError(f"{path}: cannot read passphrase file ({exc.strerror})") from exc
        _refuse_shared(path, mode, "passphrase file")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        if not data:
            raise PkiError(f"{path}: passphrase file is empty")
        return data
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise PkiError(f"environment variable {env} is not set (expected the key passphrase)")
        if not value:
            raise PkiError(f"environment variable {env} is empty (expected the key passphrase)")
        return value.encode("utf-8")
    return None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers never see half a key."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"refusing to overwrite existing {', '.join(existing)} (use force to replace)")


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{path}: cannot create directory ({exc.strerror})") from exc


def _refuse_shared(path: Path, mode: int, what: str) -> None:
    """A key or passphrase other users can read (or change) is refused, not used with a warning."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PkiError(f"{path}: {what} is open to other users (mode {stat.S_IMODE(mode):o}); chmod 600 it")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: {what} not found") from exc
    except OSError as exc:
        raise PkiError(f"{path}: cannot read {what} ({exc.strerror})") from exc


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read a PEM certificate, with an error naming the file when it is missing or malformed."""
    p = Path(path)
    try:
        return x509.load_pem_x509_certificate(_read(p, "certificate"))
    except ValueError as exc:
        raise PkiError(f"{p}: not a PEM X.509 certificate") from exc


def load_private_key(
    path: str | os.PathLike[str], passphrase: bytes | None = None
) -> ec.EllipticCurvePrivateKey:
    """Read a PEM P-256 private key, decrypting it with ``passphrase`` when it is protected."""
    p = Path(path)
    data = _read(p, "private key")
    _refuse_shared(p, p.stat().st_mode, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise PkiError(f"{p}: key is passphrase-protected; give the passphrase file or variable") from exc
        raise PkiError(f"{p}: key is not passphrase-protected but a passphrase was given") from exc
    except ValueError as exc:
        if passphrase is not None:
            raise PkiError(f"{p}: cannot decrypt key (wrong passphrase or not a PEM private key)") from exc
        raise PkiError(f"{p}: not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{p}: expected an EC P-256 private key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption
    if passphrase is None:
        encryption = serialization.NoEncryption()
    else:
        if not passphrase:
            raise PkiError("the key passphrase is empty")
        encryption = serialization.BestAvailableEncryption(passphrase)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------------------------
# Names and identities


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of ``cert`` as lowercase hex: how silos pin each other out of band."""
    return cert.fingerprint(hashes.SHA256()).hex()


def validate_silo_id(silo_id: str) -> str:
    """Return ``silo_id`` when it is a valid silo id, else raise with the rule it breaks."""
    if not isinstance(silo_id, str) or not SILO_ID_PATTERN.fullmatch(silo_id):
        raise PkiError(
            f"invalid silo id {silo_id!r}: expected 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return silo_id


def _subject_text(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty subject)"


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _silo_uris(extensions: x509.Extensions) -> list[str] | None:
    """All URIs in the SAN extension, or None when there is no SAN extension."""
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def silo_id_from_certificate(cert: x509.Certificate) -> str:
    """The silo identity of a certificate: its SAN URI ``condi://silo/<id>``, else its CN."""
    subject = _subject_text(cert.subject)
    uris = [u for u in (_silo_uris(cert.extensions) or []) if u.startswith(SILO_URI_PREFIX)]
    if len(uris) > 1:
        raise CertificateRejected(subject, f"{len(uris)} {SILO_URI_PREFIX} URIs in the SAN, expected one")
    candidate = uris[0][len(SILO_URI_PREFIX) :] if uris else _common_name(cert.subject)
    if candidate is None:
        raise CertificateRejected(subject, f"no {SILO_URI_PREFIX} SAN URI and no common name")
    try:
        return validate_silo_id(candidate)
    except PkiError as exc:
        raise CertificateRejected(subject, str(exc)) from exc


def _ski(public_key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_days(days: int, what: str) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(f"{what} must be a whole number of days >= 1, got {days!r}")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise PkiError("now must be timezone-aware")
    return now


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


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
    _check_days(days, "CA validity")
    if not common_name or len(common_name) > 64:
        raise PkiError(f"CA common name must be 1-64 characters, got {common_name!r}")
    paths = CaPaths.in_dir(out_dir)
    _refuse_overwrite([paths.key, paths.cert, paths.crl], force)
    _make_dir(paths.key.parent)
    t0 = _now(now)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = _ski(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t0 - _CLOCK_SKEW)
        .not_valid_after(t0 + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(paths.key, _key_pem(key, passphrase), _KEY_MODE)
    _write_atomic(paths.cert, _cert_pem(cert), _PUBLIC_MODE)
    _write_crl(paths.crl, key, cert, [], crl_number=1, now=t0, next_update_days=_DEFAULT_CRL_DAYS)
    log.info("created CA %r in %s (valid until %s)", common_name, paths.cert.parent, cert.not_valid_after_utc)
    return paths


def load_ca(
    ca_dir: str | os.PathLike[str], passphrase: bytes | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate from ``ca_dir``, checked to belong together."""
    paths = CaPaths.in_dir(ca_dir)
    cert = load_certificate(paths.cert)
    key = load_private_key(paths.key, passphrase)
    if not _same_public_key(key.public_key(), cert.public_key()):
        raise PkiError(f"{paths.key}: key does not match the CA certificate {paths.cert}")
    return key, cert


def _same_public_key(a: object, b: object) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return a.public_bytes(*fmt) == b.public_bytes(*fmt)
    except (AttributeError, TypeError, ValueError):
        return False


def _validity(
    ca_cert: x509.Certificate, days: int, now: datetime | None, what: str
) -> tuple[datetime, datetime]:
    """Validity window for an issued certificate, never extending past the CA's own expiry."""
    t0 = _now(now)
    not_after = t0 + timedelta(days=days)
    ca_end = ca_cert.not_valid_after_utc
    if t0 >= ca_end:
        raise PkiError(f"the CA certificate expired on {ca_end:%Y-%m-%d}; cannot issue {what}")
    if not_after > ca_end:
        log.warning("%s would outlive the CA; its validity is cut to %s", what, ca_end)
        not_after = ca_end
    return t0 - _CLOCK_SKEW, not_after


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
    _refuse_overwrite([paths.key, paths.csr], force)
    _make_dir(root)
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, silo_id)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SILO_URI_PREFIX + silo_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_atomic(paths.key, _key_pem(key, passphrase), _KEY_MODE)
    _write_atomic(paths.csr, csr.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
    log.info("created key and request for silo %s in %s", silo_id, root)
    return paths


def _silo_id_from_csr(csr: x509.CertificateSigningRequest, source: Path) -> str:
    uris = _silo_uris(csr.extensions)
    if uris is None:
        raise PkiError(f"{source}: request has no subjectAltName; expected one URI {SILO_URI_PREFIX}<id>")
    if len(uris) != 1:
        raise PkiError(
            f"{source}: request has {len(uris)} SAN URIs; expected exactly one {SILO_URI_PREFIX}<id>"
        )
    if not uris[0].startswith(SILO_URI_PREFIX):
        raise PkiError(f"{source}: SAN URI {uris[0]!r} does not start with {SILO_URI_PREFIX}")
    try:
        silo_id = validate_silo_id(uris[0][len(SILO_URI_PREFIX) :])
    except PkiError as exc:
        raise PkiError(f"{source}: {exc}") from exc
    cn = _common_name(csr.subject)
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
    _check_days(days, "certificate validity")
    src = Path(csr_path)
    out = Path(out_path)
    try:
        csr = x509.load_pem_x509_csr(_read(src, "certificate request"))
    except ValueError as exc:
        raise PkiError(f"{src}: not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise PkiError(f"{src}: request signature is invalid")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PkiError(f"{src}: request key is not EC P-256")
    silo_id = _silo_id_from_csr(csr, src)
    if expected_silo_id is not None and silo_id != expected_silo_id:
        raise PkiError(f"{src}: request is for silo {silo_id!r}, expected {expected_silo_id!r}")
    _refuse_overwrite([out], force)
    ca_key, ca_cert = load_ca(ca_dir, ca_passphrase)
    not_before, not_after = _validity(ca_cert, days, now, f"certificate for silo {silo_id}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, silo_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SILO_URI_PREFIX + silo_id)]),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _make_dir(out.parent)
    _write_atomic(out, _cert_pem(cert), _PUBLIC_MODE)
    log.info(
        "issued certificate for silo %s, serial %x, valid until %s", silo_id, cert.serial_number, not_after
    )
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
    _check_days(days, "certificate validity")
    san = _validate_server_names(hostnames, ips)
    root = Path(out_dir)
    paths = ServerPaths(key=root / "server.key", cert=root / "server.crt")
    _refuse_overwrite([paths.key, paths.cert], force)
    ca_key, ca_cert = load_ca(ca_dir, ca_passphrase)
    not_before, not_after = _validity(ca_cert, days, now, "server certificate")
    key = _new_key()
    first = san[0].value
    cn = str(first) if len(str(first)) <= 64 else "CondI coordinator"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _make_dir(root)
    _write_atomic(paths.key, _key_pem(key, None), _KEY_MODE)
    _write_atomic(paths.cert, _cert_pem(cert), _PUBLIC_MODE)
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
    server = issue_server_cert(
        root / "ca", root / "server", hostnames=hostnames, ips=ips, days=days, force=force
    )
    silos: dict[str, SiloPaths] = {}
    for sid in ids:
        req = make_request(root / "silos" / sid, sid, force=force)
        cert = sign_request(
            req.csr, root / "ca", req.csr.with_suffix(".crt"), days=days, force=force, expected_silo_id=sid
        )
        silos[sid] = SiloPaths(key=req.key, csr=req.csr, cert=cert)
    return DevPki(root=root, ca=ca, server=server, silos=silos)


# ---------------------------------------------------------------------------------------------
# Revocation


def _write_crl(
    path: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
    *,
    crl_number: int,
    now: datetime,
    next_update_days: int,
) -> None:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)


def _load_crl(crl_path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(_read(crl_path, "revocation list"))
    except ValueError as exc:
        raise PkiError(f"{crl_path}: not a PEM certificate revocation list") from exc
    if crl.issuer != ca_cert.subject:
        raise PkiError(
            f"{crl_path}: revocation list was issued by {_subject_text(crl.issuer)}, not by this CA"
        )
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise PkiError(f"{crl_path}: revocation list signature does not verify against the CA; refusing it")
    return crl


@dataclass(frozen=True)
class Revocations:
    """What one CA-signed CRL says: its CRLNumber (-1 when it has none) and the revoked serials."""

    number: int
    serials: frozenset[int]


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
    if next_update is not None and _now(now) > next_update:
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
    next_update_days: int = _DEFAULT_CRL_DAYS,
    now: datetime | None = None,
) -> Path:
    """Add the certificate at ``cert_path`` to the CA's CRL (``crl.pem`` in ``ca_dir``) and re-sign it.

    Revoking an already revoked certificate leaves the CRL as it is. Returns the CRL path.
    """
    _check_days(next_update_days, "CRL next-update interval")
    if reason == x509.ReasonFlags.remove_from_crl:
        raise PkiError("reason remove_from_crl only applies to delta CRLs")
    paths = CaPaths.in_dir(ca_dir)
    ca_key, ca_cert = load_ca(ca_dir, ca_passphrase)
    target = load_certificate(cert_path)
    try:
        target.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{cert_path}: certificate was not issued by the CA in {ca_dir}") from exc
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
    t0 = _now(now)
    entry = x509.RevokedCertificateBuilder().serial_number(target.serial_number).revocation_date(t0)
    # RFC 5280: the reason code "unspecified" should be expressed by omitting the extension.
    if reason != x509.ReasonFlags.unspecified:
        entry = entry.add_extension(x509.CRLReason(reason), critical=False)
    entries.append(entry.build())
    _write_crl(
        paths.crl, ca_key, ca_cert, entries, crl_number=crl_number, now=t0, next_update_days=next_update_days
    )
    log.info(
        "revoked certificate %s (serial %x); CRL %s now lists %d",
        _subject_text(target.subject),
        target.serial_number,
        paths.crl,
        len(entries),
    )
    return paths.crl


# ---------------------------------------------------------------------------------------------
# Runtime verification


def _usage_problem(cert: x509.Certificate, ca_cert: x509.Certificate, t: datetime) -> str | None:
    """Why ``cert`` cannot serve as a silo client certificate at time ``t`` (issuer aside), or None."""
    if t < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if t > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if t > ca_cert.not_valid_after_utc:
        return f"the CA certificate expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "is a CA certificate, not a silo certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "no extended key usage; clientAuth is required"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return "no clientAuth extended key usage"
    return None


def verify_peer_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    revoked: set[int],
    now: datetime | None = None,
) -> str:
    """Accept a silo's client certificate and return its silo id, or raise :class:`CertificateRejected`.

    Checks, in order: signed by this CA, not revoked, within its validity period (and the CA's),
    not a CA certificate, has the clientAuth extended key usage, carries a valid silo id.
    """
    subject = _subject_text(cert.subject)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateRejected(
            subject, f"not issued by this CA ({_subject_text(ca_cert.subject)})"
        ) from exc
    if cert.serial_number in revoked:
        raise CertificateRejected(subject, f"revoked (serial {cert.serial_number:x})")
    problem = _usage_problem(cert, ca_cert, _now(now))
    if problem is not None:
        raise CertificateRejected(subject, problem)
    return silo_id_from_certificate(cert)


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
    t = _now(now)
    problems: list[str] = []
    warnings: list[str] = []
    key_matches = _same_public_key(key.public_key(), cert.public_key())
    if not key_matches:
        problems.append(f"{key_path} is not the private key of {cert_path}")
    try:
        cert.verify_directly_issued_by(ca_cert)
        signed_by_ca = True
    except (ValueError, TypeError, InvalidSignature):
        signed_by_ca = False
        problems.append(f"{cert_path} was not issued by the CA in {ca_path}")
    problem = _usage_problem(cert, ca_cert, t)
    if problem is not None:
        problems.append(f"{cert_path}: {problem}")
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
        subject=_subject_text(cert.subject),
        silo_id=silo_id,
        serial=cert.serial_number,
        not_valid_after=not_after,
        days_left=days_left,
        key_matches=key_matches,
        signed_by_ca=signed_by_ca,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )

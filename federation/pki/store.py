"""PKI material at rest: where keys, certificates and requests live, and how they are read and written.

Private keys are written with mode 0600 and refused when other users can read them; every file is
written atomically (temporary file, fsync, rename) so a reader never sees half a key. Errors name
the file and what is wrong with it. :class:`PkiError` is defined here because every PKI module
reads or writes through this one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700


class PkiError(Exception):
    """A PKI operation that cannot be done; the message names the file or value and what is wrong."""


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
    """One silo's key, request and signed certificate, as laid out by :func:`federation.pki.dev_pki`."""

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


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600, encrypted with ``passphrase`` when one is given."""
    encryption: serialization.KeySerializationEncryption
    if passphrase is None:
        encryption = serialization.NoEncryption()
    else:
        if not passphrase:
            raise PkiError("the key passphrase is empty")
        encryption = serialization.BestAvailableEncryption(passphrase)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_atomic(path, pem, _KEY_MODE)


def write_public(path: Path, pem: bytes) -> None:
    """Write a certificate, request or revocation list (PEM), readable by everyone (mode 0644)."""
    _write_atomic(path, pem, _PUBLIC_MODE)


def refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Raise naming every one of ``paths`` that exists, unless ``force`` allows replacing them."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"refusing to overwrite existing {', '.join(existing)} (use force to replace)")


def make_dir(path: Path) -> None:
    """Create ``path`` and its parents (mode 0700), with an error naming it when that fails."""
    try:
        path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{path}: cannot create directory ({exc.strerror})") from exc


def _refuse_shared(path: Path, mode: int, what: str) -> None:
    """A key or passphrase other users can read (or change) is refused, not used with a warning."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PkiError(f"{path}: {what} is open to other users (mode {stat.S_IMODE(mode):o}); chmod 600 it")


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``, with an error saying which ``what`` is missing or unreadable."""
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
        return x509.load_pem_x509_certificate(read_file(p, "certificate"))
    except ValueError as exc:
        raise PkiError(f"{p}: not a PEM X.509 certificate") from exc


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Read a PEM P-256 private key, decrypting it with ``passphrase`` when it is protected."""
    p = Path(path)
    data = read_file(p, "private key")
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


def same_public_key(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are the same public key; False for anything that is not a key."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return a.public_bytes(*fmt) == b.public_bytes(*fmt)
    except (AttributeError, TypeError, ValueError):
        return False


def load_ca(
    ca_dir: str | os.PathLike[str], passphrase: bytes | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate from ``ca_dir``, checked to belong together."""
    paths = CaPaths.in_dir(ca_dir)
    cert = load_certificate(paths.cert)
    key = load_private_key(paths.key, passphrase)
    if not same_public_key(key.public_key(), cert.public_key()):
        raise PkiError(f"{paths.key}: key does not match the CA certificate {paths.cert}")
    return key, cert

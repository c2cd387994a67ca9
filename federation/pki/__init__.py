"""The federation's X.509 PKI: an operator CA, hospital-kept silo keys, server certs, revocation.

One idea per module; everything public is importable from here as ``pki.<name>``:

- :mod:`~federation.pki.store`: PKI material at rest. Paths (:class:`CaPaths` ...), reading keys,
  certificates and passphrases, atomic writes with private file modes, :class:`PkiError`.
- :mod:`~federation.pki.clock`: the ``now`` and day-count arguments, and the tolerated clock skew.
- :mod:`~federation.pki.extensions`: the X.509 extensions the CA writes (key usage, key ids).
- :mod:`~federation.pki.issue`: the CA (:func:`init_ca`), hospital requests (:func:`make_request`),
  signing them (:func:`sign_request`), the coordinator's certificate and :func:`dev_pki`.
- :mod:`~federation.pki.crl`: the CA-signed revocation list: :func:`revoke` writes it,
  :func:`load_revocations` reads it.
- :mod:`~federation.pki.verify`: whether a certificate may be used. ``cryptography``'s verifier
  decides the chain, validity and usage; this module adds the federation's rules (clientAuth or
  serverAuth present, revocation, the silo id from the SAN URI ``condi://silo/<id>``). The
  coordinator calls :func:`verify_peer_certificate` on every client certificate, a silo calls
  :func:`check_chain` before it connects, and :mod:`federation.tls` checks its own server
  certificate with :func:`server_certificate_problem`.

Nothing in this package logs key material or passphrases.
"""

from federation.pki.crl import Revocations, load_revocations, load_revoked_serials, revoke
from federation.pki.issue import dev_pki, init_ca, issue_server_cert, make_request, sign_request
from federation.pki.store import (
    CaPaths,
    DevPki,
    PkiError,
    RequestPaths,
    ServerPaths,
    SiloPaths,
    load_ca,
    load_certificate,
    load_private_key,
    read_passphrase,
)
from federation.pki.verify import (
    SILO_URI_PREFIX,
    CertificateRejected,
    ChainReport,
    certificate_fingerprint,
    check_chain,
    server_certificate_problem,
    silo_id_from_certificate,
    validate_silo_id,
    verify_peer_certificate,
)

__all__ = [
    "SILO_URI_PREFIX",
    "CaPaths",
    "CertificateRejected",
    "ChainReport",
    "DevPki",
    "PkiError",
    "RequestPaths",
    "Revocations",
    "ServerPaths",
    "SiloPaths",
    "certificate_fingerprint",
    "check_chain",
    "dev_pki",
    "init_ca",
    "issue_server_cert",
    "load_ca",
    "load_certificate",
    "load_private_key",
    "load_revocations",
    "load_revoked_serials",
    "make_request",
    "read_passphrase",
    "revoke",
    "server_certificate_problem",
    "sign_request",
    "silo_id_from_certificate",
    "validate_silo_id",
    "verify_peer_certificate",
]

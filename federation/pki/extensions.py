"""The X.509 extensions the federation CA writes into what it signs.

Every certificate gets a critical basicConstraints and keyUsage and both key identifiers; a CRL
gets the authority key identifier. They are what ``cryptography.x509.verification`` (used by
:mod:`federation.pki.verify`) demands: a CA with a critical basicConstraints (cA) and keyCertSign,
and an authorityKeyIdentifier on every leaf. Certificates issued before the verifier was used
carry the same extensions, so they keep verifying.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec


def key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    """Key usage of a leaf (``digital_signature``: TLS handshakes) or the CA (``cert_sign``: certificates and CRLs)."""
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


def subject_key_id(public_key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    """The subject key identifier of ``public_key`` (RFC 5280 method 1: SHA-1 of the key bits)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The identifier that links what ``ca_cert``'s key signs back to it: its SKI, else one derived from its key."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

"""The federation PKI: CA, hospital requests, signing, revocation and the runtime checks."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import VerificationError

from federation import certs_cli, pki

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ca")
    pki.init_ca(root)
    return root


@pytest.fixture(scope="module")
def silo_cert(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pki.RequestPaths, Path]:
    site = tmp_path_factory.mktemp("site")
    req = pki.make_request(site, "charite-icu")
    cert = pki.sign_request(req.csr, ca_dir, site / "charite-icu.crt", expected_silo_id="charite-icu")
    return req, cert


def _ca_cert(ca_dir: Path) -> x509.Certificate:
    return pki.load_certificate(ca_dir / "ca.crt")


def _csr(path: Path, *, cn: str | None, uris: list[str] | None, curve: ec.EllipticCurve | None = None) -> Path:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if uris is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_certificate_is_a_path_length_zero_signing_ca(ca_dir: Path) -> None:
    cert = _ca_cert(ca_dir)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert pki.load_revoked_serials(ca_dir / "crl.pem", cert) == set()


def test_request_sign_verify_gives_the_silo_id(ca_dir: Path, silo_cert: tuple[pki.RequestPaths, Path]) -> None:
    req, cert_path = silo_cert
    cert = pki.load_certificate(cert_path)
    ca = _ca_cert(ca_dir)
    assert pki.verify_peer_certificate(cert, ca, revoked=set()) == "charite-icu"
    ext = cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    uris = ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["condi://silo/charite-icu"]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # The certificate carries the hospital's own key, which never went to the CA.
    key = pki.load_private_key(req.key)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=364)


def test_serials_are_random_and_distinct(ca_dir: Path, tmp_path: Path) -> None:
    req = pki.make_request(tmp_path, "site-a")
    a = pki.load_certificate(pki.sign_request(req.csr, ca_dir, tmp_path / "a.crt"))
    b = pki.load_certificate(pki.sign_request(req.csr, ca_dir, tmp_path / "b.crt"))
    assert a.serial_number != b.serial_number
    assert a.serial_number.bit_length() > 64


def test_certificate_from_another_ca_is_rejected(ca_dir: Path, tmp_path: Path) -> None:
    other = pki.init_ca(tmp_path / "other", common_name="CondI Federation CA")  # same name, other key
    req = pki.make_request(tmp_path / "site", "intruder")
    foreign = pki.load_certificate(pki.sign_request(req.csr, other.cert.parent, tmp_path / "intruder.crt"))
    with pytest.raises(pki.CertificateRejected, match="not issued by this CA") as info:
        pki.verify_peer_certificate(foreign, _ca_cert(ca_dir), revoked=set())
    assert "intruder" in str(info.value)


def test_expired_certificate_is_rejected_with_its_date(tmp_path: Path) -> None:
    issued = datetime.now(UTC) - timedelta(days=100)
    # The CA must already exist when the certificate is checked in the past: the verifier checks its validity too.
    ca = pki.init_ca(tmp_path / "ca", now=issued)
    req = pki.make_request(tmp_path, "old-site")
    cert = pki.load_certificate(
        pki.sign_request(req.csr, ca.cert.parent, tmp_path / "old.crt", days=30, now=issued)
    )
    expiry = (issued + timedelta(days=30)).strftime("%Y-%m-%d")
    with pytest.raises(pki.CertificateRejected, match=f"expired on {expiry}") as info:
        pki.verify_peer_certificate(cert, _ca_cert(ca.cert.parent), revoked=set())
    assert info.value.subject == "CN=old-site"
    # The same certificate was fine while it was valid.
    assert pki.verify_peer_certificate(cert, _ca_cert(ca.cert.parent), revoked=set(), now=issued + timedelta(days=1))


def test_not_yet_valid_certificate_is_rejected(silo_cert: tuple[pki.RequestPaths, Path], ca_dir: Path) -> None:
    cert = pki.load_certificate(silo_cert[1])
    with pytest.raises(pki.CertificateRejected, match="not valid before"):
        pki.verify_peer_certificate(cert, _ca_cert(ca_dir), revoked=set(), now=datetime.now(UTC) - timedelta(days=1))


def test_revoked_certificate_is_rejected_and_others_still_pass(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca")
    certs = {}
    for sid in ("site-a", "site-b", "site-c"):
        req = pki.make_request(tmp_path / sid, sid)
        certs[sid] = pki.sign_request(req.csr, ca.cert.parent, tmp_path / sid / f"{sid}.crt")
    ca_cert = pki.load_certificate(ca.cert)
    pki.revoke(ca.cert.parent, certs["site-a"], reason=x509.ReasonFlags.key_compromise)
    pki.revoke(ca.cert.parent, certs["site-b"])
    pki.revoke(ca.cert.parent, certs["site-b"])  # a repeat changes nothing
    revoked = pki.load_revoked_serials(ca.crl, ca_cert)
    serial = {sid: pki.load_certificate(p).serial_number for sid, p in certs.items()}
    assert revoked == {serial["site-a"], serial["site-b"]}
    with pytest.raises(pki.CertificateRejected, match="revoked"):
        pki.verify_peer_certificate(pki.load_certificate(certs["site-a"]), ca_cert, revoked=revoked)
    assert pki.verify_peer_certificate(pki.load_certificate(certs["site-c"]), ca_cert, revoked=revoked) == "site-c"
    crl = x509.load_pem_x509_crl(ca.crl.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)
    entry = crl.get_revoked_certificate_by_serial_number(serial["site-a"])
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise


def test_revoking_a_foreign_certificate_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    other = pki.init_ca(tmp_path / "other")
    req = pki.make_request(tmp_path, "elsewhere")
    cert = pki.sign_request(req.csr, other.cert.parent, tmp_path / "elsewhere.crt")
    with pytest.raises(pki.PkiError, match="not issued by the CA"):
        pki.revoke(ca_dir, cert)


def test_crl_with_bad_signature_is_refused_naming_the_file(ca_dir: Path, tmp_path: Path) -> None:
    forger = pki.init_ca(tmp_path / "forger", common_name="CondI Federation CA")  # same issuer name
    with pytest.raises(pki.PkiError, match=r"crl\.pem.*signature does not verify") as info:
        pki.load_revoked_serials(forger.crl, _ca_cert(ca_dir))
    assert str(forger.crl) in str(info.value)
    named = pki.init_ca(tmp_path / "named", common_name="Some Other CA")
    with pytest.raises(pki.PkiError, match="not by this CA"):
        pki.load_revoked_serials(named.crl, _ca_cert(ca_dir))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a crl\n")
    with pytest.raises(pki.PkiError, match=r"garbage\.pem: not a PEM certificate revocation list"):
        pki.load_revoked_serials(garbage, _ca_cert(ca_dir))


def _raw_cert(
    ca_dir: Path,
    *,
    cn: str | None,
    uris: list[str],
    eku: list[x509.ObjectIdentifier] | None,
    aki: bool = True,
    names: tuple[x509.GeneralName, ...] = (),
) -> x509.Certificate:
    """A certificate signed by the CA in ``ca_dir`` with SAN URIs ``uris`` and other SAN ``names``."""
    ca_key, ca_cert = pki.load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
    )
    # The verifier requires an authority key identifier on every leaf; aki=False leaves it out.
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
    if uris or names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([*(x509.UniformResourceIdentifier(u) for u in uris), *names]), critical=False
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def test_silo_id_comes_from_the_san_uri_before_the_cn(ca_dir: Path) -> None:
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    both = _raw_cert(ca_dir, cn="display-name", uris=["condi://silo/uri-id"], eku=client)
    assert pki.silo_id_from_certificate(both) == "uri-id"
    cn_only = _raw_cert(ca_dir, cn="cn-id", uris=[], eku=client)
    assert pki.silo_id_from_certificate(cn_only) == "cn-id"
    two = _raw_cert(ca_dir, cn="x", uris=["condi://silo/a", "condi://silo/b"], eku=client)
    with pytest.raises(pki.CertificateRejected, match="2 condi://silo/ URIs"):
        pki.silo_id_from_certificate(two)
    nothing = _raw_cert(ca_dir, cn=None, uris=["https://example.org"], eku=client)
    with pytest.raises(pki.CertificateRejected, match="no condi://silo/ SAN URI and no common name"):
        pki.silo_id_from_certificate(nothing)
    # A SAN without a silo URI: the verifier requires a subjectAltName, and the CN is the silo id.
    bad = _raw_cert(ca_dir, cn="Not A Valid Id", uris=["https://example.org"], eku=client)
    with pytest.raises(pki.CertificateRejected, match="invalid silo id"):
        pki.verify_peer_certificate(bad, _ca_cert(ca_dir), revoked=set())


def test_certificates_without_client_auth_are_rejected(ca_dir: Path, tmp_path: Path) -> None:
    ca_cert = _ca_cert(ca_dir)
    no_eku = _raw_cert(ca_dir, cn="a", uris=["condi://silo/a"], eku=None)
    with pytest.raises(pki.CertificateRejected, match="clientAuth is required"):
        pki.verify_peer_certificate(no_eku, ca_cert, revoked=set())
    server = pki.issue_server_cert(ca_dir, tmp_path, hostnames=["localhost"], ips=[])
    with pytest.raises(pki.CertificateRejected, match="no clientAuth"):
        pki.verify_peer_certificate(pki.load_certificate(server.cert), ca_cert, revoked=set())
    with pytest.raises(pki.CertificateRejected, match="is a CA certificate"):
        pki.verify_peer_certificate(ca_cert, ca_cert, revoked=set())


@dataclass(frozen=True)
class Deployment:
    """A CA made a month ago and what it issued since, plus certificates of a second CA of the same name."""

    ca: x509.Certificate
    certs: dict[str, x509.Certificate]
    revoked: frozenset[int]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("deployment")
    month_ago = datetime.now(UTC) - timedelta(days=30)
    ca = pki.init_ca(root / "ca", now=month_ago)
    other = pki.init_ca(root / "other")  # the same default name, another key
    certs: dict[str, x509.Certificate] = {}
    for name, ca_dir, extra in [
        ("good", ca.cert.parent, {}),
        ("revoked", ca.cert.parent, {}),
        ("expired", ca.cert.parent, {"days": 1, "now": month_ago}),
        ("foreign", other.cert.parent, {}),
    ]:
        req = pki.make_request(root / name, name)
        certs[name] = pki.load_certificate(pki.sign_request(req.csr, ca_dir, root / name / "silo.crt", **extra))
    for name, ca_dir, extra in [
        ("server", ca.cert.parent, {}),
        ("server-expired", ca.cert.parent, {"days": 1, "now": month_ago}),
        ("server-foreign", other.cert.parent, {}),
    ]:
        paths = pki.issue_server_cert(ca_dir, root / name, hostnames=["localhost"], ips=["127.0.0.1"], **extra)
        certs[name] = pki.load_certificate(paths.cert)
    pki.revoke(ca.cert.parent, root / "revoked" / "silo.crt")
    ca_cert = pki.load_certificate(ca.cert)
    certs["ca"] = ca_cert
    return Deployment(ca=ca_cert, certs=certs, revoked=frozenset(pki.load_revoked_serials(ca.crl, ca_cert)))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("foreign", r"not issued by this CA \(CN=CondI Federation CA\)"),
        ("expired", r"expired on \d{4}-\d\d-\d\d"),
        ("server", "no clientAuth extended key usage"),
        ("ca", "is a CA certificate, not a silo certificate"),
    ],
)
def test_the_library_verifier_refuses_unfit_client_certificates(
    deployment: Deployment, case: str, reason: str
) -> None:
    assert pki.verify_peer_certificate(deployment.certs["good"], deployment.ca, revoked=deployment.revoked) == "good"
    with pytest.raises(pki.CertificateRejected, match=reason) as info:
        pki.verify_peer_certificate(deployment.certs[case], deployment.ca, revoked=deployment.revoked)
    # cryptography's verifier refused it; the federation only put the reason in its own words.
    assert isinstance(info.value.__cause__, VerificationError)
    assert info.value.subject == deployment.certs[case].subject.rfc4514_string()


def test_a_revoked_certificate_the_library_accepts_is_still_refused(deployment: Deployment) -> None:
    cert = deployment.certs["revoked"]
    assert pki.verify_peer_certificate(cert, deployment.ca, revoked=frozenset()) == "revoked"
    with pytest.raises(pki.CertificateRejected, match=rf"revoked \(serial {cert.serial_number:x}\)") as info:
        pki.verify_peer_certificate(cert, deployment.ca, revoked=deployment.revoked)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("server", None),
        ("server-foreign", r"not issued by this CA \(CN=CondI Federation CA\)"),
        ("server-expired", r"expired on \d{4}-\d\d-\d\d"),
        ("good", "no serverAuth extended key usage"),
        ("ca", "is a CA certificate, not a coordinator certificate"),
    ],
)
def test_the_library_verifier_checks_the_coordinator_certificate(
    deployment: Deployment, case: str, problem: str | None
) -> None:
    found = pki.server_certificate_problem(deployment.certs[case], deployment.ca)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.match(problem, found), found


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        ((x509.DNSName("*.example.org"), x509.DNSName("coordinator.example.org")), None),
        ((x509.DNSName("*.example.org"),), "no DNS name or IP address a silo could dial in its subjectAltName"),
        ((), "no DNS name or IP address a silo could dial in its subjectAltName"),
    ],
)
def test_a_coordinator_certificate_is_verified_for_a_name_a_silo_can_dial(
    ca_dir: Path, names: tuple[x509.GeneralName, ...], problem: str | None
) -> None:
    # The verifier cannot be built for a wildcard, so the next name is used.
    cert = _raw_cert(ca_dir, cn="c", uris=[], eku=[ExtendedKeyUsageOID.SERVER_AUTH], names=names)
    assert pki.server_certificate_problem(cert, _ca_cert(ca_dir)) == problem


@pytest.mark.parametrize(
    ("aki", "uris", "extension"),
    [
        (False, ["condi://silo/a"], ExtensionOID.AUTHORITY_KEY_IDENTIFIER),
        (True, [], ExtensionOID.SUBJECT_ALTERNATIVE_NAME),
    ],
)
def test_leaves_lacking_what_the_library_policy_requires_are_refused(
    ca_dir: Path, aki: bool, uris: list[str], extension: x509.ObjectIdentifier
) -> None:
    """Rules the hand-written checks never had: they show the library's policy is the one applied."""
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_cert = _ca_cert(ca_dir)
    complete = _raw_cert(ca_dir, cn="a", uris=["condi://silo/a"], eku=client)
    assert pki.verify_peer_certificate(complete, ca_cert, revoked=set()) == "a"
    lacking = _raw_cert(ca_dir, cn="a", uris=uris, eku=client, aki=aki)
    with pytest.raises(pki.CertificateRejected, match=re.escape(extension.dotted_string)) as info:
        pki.verify_peer_certificate(lacking, ca_cert, revoked=set())
    assert isinstance(info.value.__cause__, VerificationError)
    assert "<Certificate" not in str(info.value)


@pytest.mark.parametrize(
    ("cn", "uris", "curve", "message"),
    [
        ("site-x", None, None, "no subjectAltName"),
        ("site-x", ["condi://silo/site-x", "condi://silo/site-y"], None, "2 SAN URIs"),
        ("site-x", ["https://site-x.example"], None, "does not start with condi://silo/"),
        ("site-y", ["condi://silo/site-x"], None, "does not match the SAN silo id"),
        ("Site_X", ["condi://silo/Site_X"], None, "invalid silo id"),
        ("site-x", ["condi://silo/site-x"], ec.SECP384R1(), "not EC P-256"),
    ],
)
def test_bad_requests_are_refused(
    ca_dir: Path, tmp_path: Path, cn: str, uris: list[str] | None, curve: ec.EllipticCurve | None, message: str
) -> None:
    csr = _csr(tmp_path / "r.csr", cn=cn, uris=uris, curve=curve)
    with pytest.raises(pki.PkiError, match=message) as info:
        pki.sign_request(csr, ca_dir, tmp_path / "r.crt")
    assert str(csr) in str(info.value)
    assert not (tmp_path / "r.crt").exists()


def test_request_for_another_silo_than_expected_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    req = pki.make_request(tmp_path, "site-a")
    with pytest.raises(pki.PkiError, match="request is for silo 'site-a', expected 'site-b'"):
        pki.sign_request(req.csr, ca_dir, tmp_path / "x.crt", expected_silo_id="site-b")


def test_tampered_request_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    req = pki.make_request(tmp_path, "site-a")
    der = bytearray(x509.load_pem_x509_csr(req.csr.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[der.index(b"site-a")] = ord("t")  # CN becomes "tite-a"; the signature no longer matches
    forged = x509.load_der_x509_csr(bytes(der))
    req.csr.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(pki.PkiError, match="signature is invalid"):
        pki.sign_request(req.csr, ca_dir, tmp_path / "x.crt")


@pytest.mark.parametrize("bad", ["", "-lead", "Upper", "under_score", "a" * 64, "with space", "dot.ted"])
def test_invalid_silo_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(pki.PkiError, match="invalid silo id"):
        pki.make_request(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_passphrase_protected_ca_needs_the_passphrase(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca", passphrase=b"correct horse")
    assert ca.key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    req = pki.make_request(tmp_path / "site", "site-a", passphrase=b"site secret")
    assert req.key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(pki.PkiError, match=r"ca\.key: key is passphrase-protected"):
        pki.sign_request(req.csr, ca.cert.parent, tmp_path / "a.crt")
    with pytest.raises(pki.PkiError, match=r"ca\.key: cannot decrypt key"):
        pki.sign_request(req.csr, ca.cert.parent, tmp_path / "a.crt", ca_passphrase=b"wrong")
    cert = pki.sign_request(req.csr, ca.cert.parent, tmp_path / "a.crt", ca_passphrase=b"correct horse")
    with pytest.raises(pki.PkiError, match="passphrase-protected"):
        pki.check_chain(cert, req.key, ca.cert)
    report = pki.check_chain(cert, req.key, ca.cert, passphrase=b"site secret")
    assert report.ok and report.silo_id == "site-a"
    with pytest.raises(pki.PkiError, match="passphrase-protected"):
        pki.revoke(ca.cert.parent, cert)


def test_key_files_are_private_and_never_silently_overwritten(tmp_path: Path) -> None:
    dev = pki.dev_pki(tmp_path / "dev", 2)
    keys = [dev.ca.key, dev.server.key, *(s.key for s in dev.silos.values())]
    assert all(_mode(k) == 0o600 for k in keys)
    assert _mode(dev.ca.cert) == 0o644
    assert not list(tmp_path.rglob("*.tmp"))
    before = dev.ca.key.read_bytes()
    with pytest.raises(pki.PkiError, match=r"refusing to overwrite.*ca\.key"):
        pki.init_ca(dev.ca.cert.parent)
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.make_request(dev.silos["silo-1"].key.parent, "silo-1")
    assert dev.ca.key.read_bytes() == before
    pki.init_ca(dev.ca.cert.parent, force=True)
    assert dev.ca.key.read_bytes() != before
    assert _mode(dev.ca.key) == 0o600


def test_server_certificate_has_server_auth_and_sans(ca_dir: Path, tmp_path: Path) -> None:
    paths = pki.issue_server_cert(
        ca_dir, tmp_path, hostnames=["coordinator.example.org", "LOCALHOST"], ips=["10.1.2.3", "::1"]
    )
    cert = pki.load_certificate(paths.cert)
    cert.verify_directly_issued_by(_ca_cert(ca_dir))
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")]
    assert _mode(paths.key) == 0o600
    key = pki.load_private_key(paths.key)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


@pytest.mark.parametrize(
    ("hosts", "ips", "message"),
    [([], [], "at least one hostname or IP"), (["bad_host"], [], "invalid server hostname"), ([], ["1.2.3"], "IP")],
)
def test_bad_server_names_are_refused(
    ca_dir: Path, tmp_path: Path, hosts: list[str], ips: list[str], message: str
) -> None:
    with pytest.raises(pki.PkiError, match=message):
        pki.issue_server_cert(ca_dir, tmp_path, hostnames=hosts, ips=ips)


def test_issued_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "ca", days=10)
    req = pki.make_request(tmp_path, "site-a")
    cert = pki.load_certificate(pki.sign_request(req.csr, ca.cert.parent, tmp_path / "a.crt", days=365))
    assert cert.not_valid_after_utc == pki.load_certificate(ca.cert).not_valid_after_utc


def test_check_chain_reports_mismatches_and_expiry(tmp_path: Path, ca_dir: Path) -> None:
    dev = pki.dev_pki(tmp_path / "dev", 2)
    one, two = dev.silos["silo-1"], dev.silos["silo-2"]
    good = pki.check_chain(one.cert, one.key, dev.ca.cert)
    assert good.ok and good.key_matches and good.signed_by_ca
    assert good.silo_id == "silo-1" and good.days_left == 364 and not good.warnings
    swapped = pki.check_chain(one.cert, two.key, dev.ca.cert)
    assert not swapped.ok and not swapped.key_matches
    assert any("is not the private key" in p for p in swapped.problems)
    foreign = pki.check_chain(one.cert, one.key, ca_dir / "ca.crt")
    assert not foreign.ok and not foreign.signed_by_ca and foreign.key_matches
    soon = pki.check_chain(one.cert, one.key, dev.ca.cert, now=datetime.now(UTC) + timedelta(days=350))
    assert soon.ok and soon.days_left in (13, 14) and "expires in" in soon.warnings[0]
    late = pki.check_chain(one.cert, one.key, dev.ca.cert, now=datetime.now(UTC) + timedelta(days=400))
    assert not late.ok and late.days_left < 0 and "expired on" in late.problems[0]
    with pytest.raises(pki.PkiError, match=r"nope\.crt: certificate not found"):
        pki.check_chain(tmp_path / "nope.crt", one.key, dev.ca.cert)


def test_dev_pki_custom_ids_and_validation(tmp_path: Path) -> None:
    dev = pki.dev_pki(tmp_path / "d", 2, silo_ids=["alpha", "beta"])
    assert set(dev.silos) == {"alpha", "beta"}
    ca_cert = pki.load_certificate(dev.ca.cert)
    for sid, paths in dev.silos.items():
        assert pki.verify_peer_certificate(pki.load_certificate(paths.cert), ca_cert, revoked=set()) == sid
    with pytest.raises(pki.PkiError, match="not unique"):
        pki.dev_pki(tmp_path / "e", 2, silo_ids=["alpha", "alpha"])
    with pytest.raises(pki.PkiError, match="2 silo ids for 3 silos"):
        pki.dev_pki(tmp_path / "f", 3, silo_ids=["alpha", "beta"])


def test_read_passphrase_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pass"
    f.write_bytes(b"s3cret\n")
    f.chmod(0o600)
    assert pki.read_passphrase(file=f) == b"s3cret"
    monkeypatch.setenv("CONDI_TEST_PASS", "from-env")
    assert pki.read_passphrase(env="CONDI_TEST_PASS") == b"from-env"
    assert pki.read_passphrase() is None
    with pytest.raises(pki.PkiError, match="CONDI_TEST_MISSING is not set"):
        pki.read_passphrase(env="CONDI_TEST_MISSING")
    with pytest.raises(pki.PkiError, match="not both"):
        pki.read_passphrase(file=f, env="CONDI_TEST_PASS")
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    empty.chmod(0o600)
    with pytest.raises(pki.PkiError, match="empty: passphrase file is empty"):
        pki.read_passphrase(file=empty)
    f.chmod(0o640)
    with pytest.raises(pki.PkiError, match=r"pass: passphrase file is open to other users \(mode 640\); chmod 600 it"):
        pki.read_passphrase(file=f)
    dev = pki.dev_pki(tmp_path / "dev", 1)
    key = dev.silos["silo-1"].key
    assert pki.load_private_key(key) is not None  # written 0600
    key.chmod(0o644)
    with pytest.raises(pki.PkiError, match="private key is open to other users"):
        pki.load_private_key(key)
    with pytest.raises(pki.PkiError, match="absent: cannot read passphrase file"):
        pki.read_passphrase(file=tmp_path / "absent")


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation.certs_cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_dev_writes_a_working_pki(tmp_path: Path) -> None:
    done = _cli("dev", "--silos", "3", "--out", "tmp", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "tmp"
    expected = {"ca/ca.key", "ca/ca.crt", "ca/crl.pem", "server/server.key", "server/server.crt"}
    for i in (1, 2, 3):
        expected |= {f"silos/silo-{i}/silo-{i}.{ext}" for ext in ("key", "csr", "crt")}
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == expected
    ca_cert = pki.load_certificate(root / "ca/ca.crt")
    revoked = pki.load_revoked_serials(root / "ca/crl.pem", ca_cert)
    for i in (1, 2, 3):
        cert = pki.load_certificate(root / f"silos/silo-{i}/silo-{i}.crt")
        assert pki.verify_peer_certificate(cert, ca_cert, revoked=revoked) == f"silo-{i}"
        assert _mode(root / f"silos/silo-{i}/silo-{i}.key") == 0o600
    again = _cli("dev", "--silos", "3", "--out", "tmp", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "refusing to overwrite" in again.stderr


def test_cli_operator_and_hospital_workflow(tmp_path: Path) -> None:
    secret = {"CONDI_CA_PASS": "operator secret"}
    steps = [
        ("init-ca", "--out", "op/ca", "--passphrase-env", "CONDI_CA_PASS"),
        ("request", "--silo-id", "site-a", "--out", "hospital"),
        ("sign", "--csr", "hospital/site-a.csr", "--silo-id", "site-a", "--ca-dir", "op/ca",
         "--passphrase-env", "CONDI_CA_PASS"),
        ("server", "--ca-dir", "op/ca", "--out", "op/server", "--host", "localhost", "--ip", "127.0.0.1",
         "--passphrase-env", "CONDI_CA_PASS"),
        ("revoke", "--ca-dir", "op/ca", "--cert", "hospital/site-a.crt", "--reason", "superseded",
         "--passphrase-env", "CONDI_CA_PASS"),
    ]  # fmt: skip
    for step in steps:
        done = _cli(*step, cwd=tmp_path, env=secret)
        assert done.returncode == 0, (step, done.stderr)
        assert "operator secret" not in done.stdout + done.stderr
    ca_cert = pki.load_certificate(tmp_path / "op/ca/ca.crt")
    cert = pki.load_certificate(tmp_path / "hospital/site-a.crt")
    assert cert.serial_number in pki.load_revoked_serials(tmp_path / "op/ca/crl.pem", ca_cert)
    denied = _cli("sign", "--csr", "hospital/site-a.csr", "--ca-dir", "op/ca", "--out", "x.crt", cwd=tmp_path)
    assert denied.returncode == 2
    assert denied.stderr.strip().startswith("condi certs sign: error:") and "passphrase-protected" in denied.stderr
    assert denied.stderr.count("\n") == 1
    missing = _cli("sign", "--csr", "nowhere.csr", cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere.csr: certificate request not found" in missing.stderr


def test_stale_crl_is_used_but_logged(ca_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    later = datetime.now(UTC) + timedelta(days=200)
    with caplog.at_level("WARNING", logger="federation.pki"):
        assert pki.load_revoked_serials(ca_dir / "crl.pem", _ca_cert(ca_dir), now=later) == set()
    assert "is stale" in caplog.text


def test_certs_commands_mount_on_an_umbrella_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="condi")
    certs_parser = certs_cli.add_certs_parser(parser.add_subparsers(dest="command", required=True))
    assert certs_parser.prog == "condi certs"
    args = parser.parse_args(["certs", "dev", "--silo-id", "alpha", "--silo-id", "beta", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert "2 silos (alpha, beta)" in capsys.readouterr().out
    assert (tmp_path / "silos/beta/beta.crt").is_file()
    args = parser.parse_args(["certs", "revoke", "--ca-dir", str(tmp_path / "nowhere"), "--cert", "x.crt"])
    assert args.func(args) == 2
    assert "ca.crt: certificate not found" in capsys.readouterr().err


def test_pins_prints_the_peers_section_a_site_pins_its_federation_with(tmp_path: Path) -> None:
    dev = pki.dev_pki(tmp_path / "dev", 2)
    certs = [str(dev.silos[s].cert) for s in ("silo-1", "silo-2")]
    done = _cli("pins", *certs, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    peers = yaml.safe_load(done.stdout)["peers"]
    assert peers == {s: pki.certificate_fingerprint(pki.load_certificate(dev.silos[s].cert)) for s in peers}
    assert sorted(peers) == ["silo-1", "silo-2"]
    missing = _cli("pins", str(tmp_path / "nope.crt"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.crt" in missing.stderr

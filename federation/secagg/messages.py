"""The secure-aggregation messages: frozen dataclasses that validate their fields on construction.

Ids, byte strings and lists are checked for form and bounded in size; invalid values raise
:class:`MessageError` naming the message, the field and what was expected. The messages have no
encoding of their own: they travel as the fields of the federation's protobuf contract, and
:mod:`federation.secagg_wire` converts between the two, checking a peer's fields against the
same bounds before anything is built from them.

Stage order (Bonawitz et al., CCS 2017): :class:`RoundConfig` (coordinator announces) ->
:class:`KeyAdvert` (silo) -> :class:`KeyRoster` (coordinator) -> :class:`ShareKeys` (silo) ->
:class:`ShareDelivery` (coordinator) -> :class:`MaskedInput` (silo) -> :class:`UnmaskRequest`
(coordinator) -> :class:`UnmaskResponse` (silo); :class:`RoundAbort` ends a round early.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from federation import pki
from federation.names import SILO_ID_PATTERN, is_silo_id
from federation.secagg.quantize import QuantConfig, ring_dtype
from federation.secagg.shamir import MAX_SHARES, SHARE_BYTES, Share

KEY_BYTES = 32
NONCE_BYTES = 12
# Share plaintext: x (2 bytes), then the self-mask seed share and the mask-key share.
SHARE_PLAINTEXT_BYTES = 2 + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + 16
MAX_CERT_BYTES = 16384
MAX_SIGNATURE_BYTES = 80
MAX_TEXT_BYTES = 4096
ROUND_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

CertVerifier = Callable[[bytes], str]
"""Checks a PEM certificate against the federation's PKI and returns its silo id, or raises."""


class MessageError(ValueError):
    """Field values that do not form a valid message; the text names message and field."""


class ProtocolError(Exception):
    """A well-formed message that the protocol must refuse (wrong round, stage, sender, signature...)."""


class IdentityError(ValueError):
    """This silo's own certificate or signing key is unusable (revoked, expired, another silo's,
    not the certificate's key): it cannot take part in any round until that is mended."""


def context_bytes(label: str, *parts: str) -> bytes:
    """An unambiguous byte string binding ``parts`` under ``label``, for signatures, AAD and HKDF info."""
    out = bytearray(b"condi/secagg/v1/" + label.encode() + b"\x00")
    for part in parts:
        raw = part.encode()
        out += len(raw).to_bytes(2, "big") + raw
    return bytes(out)


def _check_round_id(value: object, where: str) -> None:
    if not isinstance(value, str) or not ROUND_ID_PATTERN.fullmatch(value):
        raise MessageError(
            f"{where}: round_id must be 1-128 characters of letters, digits and ._:/- (starting with a letter"
            f" or digit), got {value!r}"
        )


def _check_silo_id(value: object, where: str) -> None:
    if not is_silo_id(value):
        raise MessageError(f"{where}: silo id must match {SILO_ID_PATTERN}, got {value!r}")


def _check_bytes(value: object, where: str, *, exact: int | None = None, most: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise MessageError(f"{where}: expected bytes, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise MessageError(f"{where}: expected {exact} bytes, got {len(value)}")
    if most is not None and len(value) > most:
        raise MessageError(f"{where}: at most {most} bytes allowed, got {len(value)}")


def _check_int(value: object, where: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MessageError(f"{where}: expected a whole number in {low}..{high}, got {value!r}")


def _check_ids(values: object, where: str) -> None:
    if not isinstance(values, tuple):
        raise MessageError(f"{where}: expected a tuple of silo ids, got {type(values).__name__}")
    if len(values) > MAX_SHARES:
        raise MessageError(f"{where}: at most {MAX_SHARES} silo ids allowed, got {len(values)}")
    for value in values:
        _check_silo_id(value, where)
    if len(set(values)) != len(values):
        raise MessageError(f"{where}: silo ids repeat: {list(values)}")


def _check_items(values: object, kind: type, where: str) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, kind) for v in values):
        raise MessageError(f"{where}: expected a tuple of {kind.__name__}")
    if len(values) > MAX_SHARES:
        raise MessageError(f"{where}: at most {MAX_SHARES} entries allowed, got {len(values)}")


@dataclass(frozen=True)
class RoundConfig:
    """What coordinator and silos agree on before a round: its id, threshold, vector length, encoding."""

    round_id: str
    threshold: int
    vector_length: int
    quant: QuantConfig

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "RoundConfig")
        _check_int(self.threshold, "RoundConfig.threshold", 2, MAX_SHARES)
        _check_int(self.vector_length, "RoundConfig.vector_length", 1, 2**40)
        if not isinstance(self.quant, QuantConfig):
            raise MessageError("RoundConfig.quant: expected a QuantConfig")


def advert_signed_bytes(round_id: str, silo_id: str, c_public: bytes, s_public: bytes) -> bytes:
    """What a silo signs in its advert: both public keys bound to the round and its own id."""
    return context_bytes("advert", round_id, silo_id) + c_public + s_public


@dataclass(frozen=True)
class KeyAdvert:
    """A silo's two fresh X25519 public keys, signed with its certificate key for this round."""

    round_id: str
    silo_id: str
    c_public: bytes
    s_public: bytes
    cert_pem: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "KeyAdvert")
        _check_silo_id(self.silo_id, "KeyAdvert.silo_id")
        _check_bytes(self.c_public, "KeyAdvert.c_public", exact=KEY_BYTES)
        _check_bytes(self.s_public, "KeyAdvert.s_public", exact=KEY_BYTES)
        _check_bytes(self.cert_pem, "KeyAdvert.cert_pem", most=MAX_CERT_BYTES)
        _check_bytes(self.signature, "KeyAdvert.signature", most=MAX_SIGNATURE_BYTES)

    @classmethod
    def signed(
        cls,
        round_id: str,
        silo_id: str,
        c_public: bytes,
        s_public: bytes,
        cert_pem: bytes,
        signing_key: ec.EllipticCurvePrivateKey,
    ) -> KeyAdvert:
        """An advert signed (ECDSA-SHA256) with the silo's certificate key."""
        payload = advert_signed_bytes(round_id, silo_id, c_public, s_public)
        return cls(
            round_id,
            silo_id,
            c_public,
            s_public,
            cert_pem,
            signing_key.sign(payload, ec.ECDSA(hashes.SHA256())),
        )

    def verify(self, verify_cert: CertVerifier) -> None:
        """Raise :class:`ProtocolError` unless the certificate passes, names this silo and signed the keys."""
        where = f"advert of {self.silo_id!r} for round {self.round_id!r}"
        try:
            cert_silo = verify_cert(self.cert_pem)
        except Exception as exc:  # the injected PKI check may raise anything; all of it means "refuse"
            raise ProtocolError(f"{where}: certificate rejected: {exc}") from exc
        if cert_silo != self.silo_id:
            raise ProtocolError(f"{where}: certificate belongs to silo {cert_silo!r}")
        try:
            key = x509.load_pem_x509_certificate(self.cert_pem).public_key()
        except ValueError as exc:
            raise ProtocolError(f"{where}: certificate is not a PEM X.509 certificate") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ProtocolError(f"{where}: certificate key is not EC P-256")
        payload = advert_signed_bytes(self.round_id, self.silo_id, self.c_public, self.s_public)
        try:
            key.verify(self.signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise ProtocolError(f"{where}: signature does not match the keys, round and silo id") from exc


@dataclass(frozen=True)
class KeyRoster:
    """The coordinator's relay of every advert it accepted (the set U1), sorted by silo id."""

    round_id: str
    adverts: tuple[KeyAdvert, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "KeyRoster")
        _check_items(self.adverts, KeyAdvert, "KeyRoster.adverts")
        _check_ids(tuple(a.silo_id for a in self.adverts), "KeyRoster.adverts")

    def silo_ids(self) -> tuple[str, ...]:
        """The advertised silos in roster order."""
        return tuple(a.silo_id for a in self.adverts)


@dataclass(frozen=True)
class EncryptedShare:
    """One silo's AES-256-GCM encrypted share pair for one recipient."""

    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_silo_id(self.sender, "EncryptedShare.sender")
        _check_silo_id(self.recipient, "EncryptedShare.recipient")
        if self.sender == self.recipient:
            raise MessageError(f"EncryptedShare: sender and recipient are both {self.sender!r}")
        _check_bytes(self.nonce, "EncryptedShare.nonce", exact=NONCE_BYTES)
        _check_bytes(self.ciphertext, "EncryptedShare.ciphertext", exact=CIPHERTEXT_BYTES)


@dataclass(frozen=True)
class ShareKeys:
    """A silo's encrypted shares, one per other advertised silo."""

    round_id: str
    sender: str
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "ShareKeys")
        _check_silo_id(self.sender, "ShareKeys.sender")
        _check_items(self.shares, EncryptedShare, "ShareKeys.shares")
        if any(s.sender != self.sender for s in self.shares):
            raise MessageError(f"ShareKeys: every share must come from the sender {self.sender!r}")
        _check_ids(tuple(s.recipient for s in self.shares), "ShareKeys.shares recipients")


@dataclass(frozen=True)
class ShareDelivery:
    """The shares addressed to one silo from every other silo whose ShareKeys arrived (the set U2)."""

    round_id: str
    recipient: str
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "ShareDelivery")
        _check_silo_id(self.recipient, "ShareDelivery.recipient")
        _check_items(self.shares, EncryptedShare, "ShareDelivery.shares")
        if any(s.recipient != self.recipient for s in self.shares):
            raise MessageError(f"ShareDelivery: every share must be addressed to {self.recipient!r}")
        _check_ids(tuple(s.sender for s in self.shares), "ShareDelivery.shares senders")


@dataclass(frozen=True)
class MaskedInput:
    """A silo's masked, quantized vector: raw little-endian ring words."""

    MAX_BYTES: ClassVar[int] = 2**32 - 1
    round_id: str
    sender: str
    ring_bits: int
    data: bytes

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "MaskedInput")
        _check_silo_id(self.sender, "MaskedInput.sender")
        if self.ring_bits not in (32, 64):
            raise MessageError(f"MaskedInput.ring_bits must be 32 or 64, got {self.ring_bits!r}")
        _check_bytes(self.data, "MaskedInput.data", most=self.MAX_BYTES)
        if len(self.data) % (self.ring_bits // 8):
            raise MessageError(
                f"MaskedInput.data: {len(self.data)} bytes is not a whole number"
                f" of {self.ring_bits}-bit words"
            )

    @property
    def length(self) -> int:
        """Number of ring elements."""
        return len(self.data) // (self.ring_bits // 8)

    def values(self) -> np.ndarray:
        """The ring vector as a read-only array."""
        return np.frombuffer(self.data, dtype=ring_dtype(self.ring_bits))


@dataclass(frozen=True)
class UnmaskRequest:
    """The coordinator's claim of who uploaded (U3) and who dropped after sharing (U2 minus U3)."""

    round_id: str
    uploaded: tuple[str, ...]
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "UnmaskRequest")
        _check_ids(self.uploaded, "UnmaskRequest.uploaded")
        _check_ids(self.dropped, "UnmaskRequest.dropped")


@dataclass(frozen=True)
class RevealedShare:
    """One Shamir share a survivor reveals, and whose secret it belongs to."""

    peer: str
    share: Share

    def __post_init__(self) -> None:
        _check_silo_id(self.peer, "RevealedShare.peer")
        if not isinstance(self.share, Share):
            raise MessageError("RevealedShare.share: expected a Share")


@dataclass(frozen=True)
class UnmaskResponse:
    """A survivor's shares: self-mask seed shares of uploaders, mask-key shares of dropped silos."""

    round_id: str
    sender: str
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "UnmaskResponse")
        _check_silo_id(self.sender, "UnmaskResponse.sender")
        _check_items(self.seed_shares, RevealedShare, "UnmaskResponse.seed_shares")
        _check_items(self.key_shares, RevealedShare, "UnmaskResponse.key_shares")
        seed_peers = tuple(s.peer for s in self.seed_shares)
        key_peers = tuple(s.peer for s in self.key_shares)
        _check_ids(seed_peers, "UnmaskResponse.seed_shares")
        _check_ids(key_peers, "UnmaskResponse.key_shares")
        both = set(seed_peers) & set(key_peers)
        if both:
            raise MessageError(f"UnmaskResponse: both shares revealed for {sorted(both)}")


@dataclass(frozen=True)
class RoundAbort:
    """The coordinator ends the round without a result; silos discard their round secrets."""

    round_id: str
    stage: str
    reason: str

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "RoundAbort")
        if not isinstance(self.stage, str) or not isinstance(self.reason, str):
            raise MessageError("RoundAbort: stage and reason must be text")
        for name, text in (("stage", self.stage), ("reason", self.reason)):
            if len(text.encode()) > MAX_TEXT_BYTES:
                raise MessageError(f"RoundAbort.{name}: at most {MAX_TEXT_BYTES} bytes allowed")


def pinned_cert_verifier(base: CertVerifier, pins: Mapping[str, str]) -> CertVerifier:
    """``base`` narrowed to the peers pinned out of band: silo id -> SHA-256 fingerprint (hex) of
    its certificate. The operator holds the federation CA and could issue certificates for silos
    that do not exist, or a second one for a real silo; neither matches a pin."""

    def verify(cert_pem: bytes) -> str:
        silo = base(cert_pem)
        fingerprint = pki.certificate_fingerprint(x509.load_pem_x509_certificate(cert_pem))
        if silo not in pins:
            raise ProtocolError(f"advert of silo {silo!r}: not among the peers pinned for this federation")
        if pins[silo] != fingerprint:
            raise ProtocolError(f"advert of silo {silo!r}: its certificate is not the one pinned for it")
        return silo

    return verify


def ca_cert_verifier(
    ca_cert: x509.Certificate, *, revoked: Callable[[], AbstractSet[int]] = frozenset
) -> CertVerifier:
    """A :data:`CertVerifier` backed by the federation CA and its revocation list (:mod:`federation.pki`):
    ``revoked`` gives the revoked serials at the time of each check (a reloading CRL's ``serials``)."""

    def verify(cert_pem: bytes) -> str:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ProtocolError("advert certificate is not a PEM X.509 certificate") from exc
        return pki.verify_peer_certificate(cert, ca_cert, revoked=set(revoked()))

    return verify

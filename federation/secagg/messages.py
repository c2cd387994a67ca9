"""The secure-aggregation messages and their explicit binary encoding.

Every message is a frozen dataclass that validates its fields on construction and has
``to_bytes`` / ``from_bytes``. The encoding is ``b"CSAG"``, a version byte and a kind byte,
then the fields in declaration order: integers big-endian and fixed width, strings and byte
strings with a length prefix, lists with a count. Ring vectors are raw little-endian words.
Nothing is pickled; malformed input raises :class:`MessageError` naming the message, the field
and what was expected. The transport only moves these bytes.

Stage order (Bonawitz et al., CCS 2017): :class:`RoundConfig` (coordinator announces) ->
:class:`KeyAdvert` (silo) -> :class:`KeyRoster` (coordinator) -> :class:`ShareKeys` (silo) ->
:class:`ShareDelivery` (coordinator) -> :class:`MaskedInput` (silo) -> :class:`UnmaskRequest`
(coordinator) -> :class:`UnmaskResponse` (silo); :class:`RoundAbort` ends a round early.
"""

from __future__ import annotations

import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from federation import pki
from federation.secagg.quantize import OverflowConfigError, QuantConfig, ring_dtype
from federation.secagg.shamir import MAX_SHARES, SHARE_BYTES, ShamirError, Share

MAGIC = b"CSAG"
VERSION = 1
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
    """Bytes or field values that do not form a valid message; the text names message and field."""


class ProtocolError(Exception):
    """A well-formed message that the protocol must refuse (wrong round, stage, sender, signature...)."""


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
    if not isinstance(value, str) or not pki.SILO_ID_PATTERN.fullmatch(value):
        raise MessageError(f"{where}: silo id must match {pki.SILO_ID_PATTERN.pattern}, got {value!r}")


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
    for value in values:
        _check_silo_id(value, where)
    if len(set(values)) != len(values):
        raise MessageError(f"{where}: silo ids repeat: {list(values)}")


def _check_items(values: object, kind: type, where: str) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, kind) for v in values):
        raise MessageError(f"{where}: expected a tuple of {kind.__name__}")
    if len(values) > MAX_SHARES:
        raise MessageError(f"{where}: at most {MAX_SHARES} entries allowed, got {len(values)}")


class _Writer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def header(self, kind: int) -> None:
        self._parts.append(MAGIC + bytes([VERSION, kind]))

    def uint(self, value: int, size: int) -> None:
        self._parts.append(value.to_bytes(size, "big"))

    def f64(self, value: float) -> None:
        self._parts.append(struct.pack(">d", value))

    def blob(self, value: bytes) -> None:
        self._parts.append(len(value).to_bytes(4, "big"))
        self._parts.append(value)

    def text(self, value: str) -> None:
        self.blob(value.encode())

    def texts(self, values: Iterable[str]) -> None:
        values = tuple(values)
        self.uint(len(values), 4)
        for v in values:
            self.text(v)

    def result(self) -> bytes:
        return b"".join(self._parts)


class _Reader:
    def __init__(self, data: bytes, message: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MessageError(f"{message}: expected bytes, got {type(data).__name__}")
        self._data = memoryview(data).cast("B")
        self._pos = 0
        self.message = message

    def _take(self, n: int, field: str) -> memoryview:
        left = len(self._data) - self._pos
        if n > left:
            raise MessageError(
                f"{self.message}: truncated at field {field!r} (offset {self._pos}):"
                f" needs {n} bytes, {left} left"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def header(self, expected_kind: int | None) -> int:
        head = bytes(self._take(6, "header"))
        if head[:4] != MAGIC:
            raise MessageError(
                f"{self.message}: not a secure-aggregation message (magic {head[:4]!r}, expected {MAGIC!r})"
            )
        if head[4] != VERSION:
            raise MessageError(
                f"{self.message}: format version {head[4]} is not supported (expected {VERSION})"
            )
        kind = head[5]
        if expected_kind is not None and kind != expected_kind:
            got = _KINDS[kind].__name__ if kind in _KINDS else f"unknown kind {kind}"
            raise MessageError(f"{self.message}: got a {got} message instead")
        return kind

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self._take(size, field), "big")

    def f64(self, field: str) -> float:
        return float(struct.unpack(">d", self._take(8, field))[0])

    def blob(self, field: str, most: int) -> bytes:
        n = self.uint(4, f"{field} length")
        if n > most:
            raise MessageError(f"{self.message}: field {field!r} claims {n} bytes, at most {most} allowed")
        return bytes(self._take(n, field))

    def text(self, field: str) -> str:
        raw = self.blob(field, MAX_TEXT_BYTES)
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise MessageError(f"{self.message}: field {field!r} is not UTF-8 text") from exc

    def count(self, field: str) -> int:
        n = self.uint(4, f"{field} count")
        if n > MAX_SHARES:
            raise MessageError(
                f"{self.message}: field {field!r} claims {n} entries, at most {MAX_SHARES} allowed"
            )
        return n

    def texts(self, field: str) -> tuple[str, ...]:
        return tuple(self.text(field) for _ in range(self.count(field)))

    def done(self) -> None:
        left = len(self._data) - self._pos
        if left:
            raise MessageError(
                f"{self.message}: {left} unexpected bytes after the last field (offset {self._pos})"
            )


class _Message(ABC):
    """Shared encode/decode plumbing; subclasses define ``KIND``, ``_encode`` and ``_decode``."""

    KIND: ClassVar[int]

    @abstractmethod
    def _encode(self, w: _Writer) -> None:
        """Write the message's fields after the header."""

    @classmethod
    @abstractmethod
    def _decode(cls, r: _Reader) -> Self:
        """Read the message's fields after the header."""

    def to_bytes(self) -> bytes:
        """The message's wire encoding."""
        w = _Writer()
        w.header(self.KIND)
        self._encode(w)
        return w.result()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode and validate one message of this type; raises :class:`MessageError` if malformed."""
        r = _Reader(data, cls.__name__)
        r.header(cls.KIND)
        msg = cls._decode(r)
        r.done()
        return msg


def _quant_from(r: _Reader) -> QuantConfig:
    clip, frac, ring = r.f64("clip_bound"), r.uint(1, "frac_bits"), r.uint(1, "ring_bits")
    try:
        return QuantConfig(clip, frac, ring)
    except OverflowConfigError as exc:
        raise MessageError(f"{r.message}: {exc}") from exc


@dataclass(frozen=True)
class RoundConfig(_Message):
    """What coordinator and silos agree on before a round: its id, threshold, vector length, encoding."""

    KIND: ClassVar[int] = 1
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

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.uint(self.threshold, 2)
        w.uint(self.vector_length, 8)
        w.f64(float(self.quant.clip_bound))
        w.uint(self.quant.frac_bits, 1)
        w.uint(self.quant.ring_bits, 1)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        round_id, threshold, length = r.text("round_id"), r.uint(2, "threshold"), r.uint(8, "vector_length")
        return cls(round_id, threshold, length, _quant_from(r))


def advert_signed_bytes(round_id: str, silo_id: str, c_public: bytes, s_public: bytes) -> bytes:
    """What a silo signs in its advert: both public keys bound to the round and its own id."""
    return context_bytes("advert", round_id, silo_id) + c_public + s_public


@dataclass(frozen=True)
class KeyAdvert(_Message):
    """A silo's two fresh X25519 public keys, signed with its certificate key for this round."""

    KIND: ClassVar[int] = 2
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

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.text(self.silo_id)
        w.blob(self.c_public)
        w.blob(self.s_public)
        w.blob(self.cert_pem)
        w.blob(self.signature)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(
            r.text("round_id"),
            r.text("silo_id"),
            r.blob("c_public", KEY_BYTES),
            r.blob("s_public", KEY_BYTES),
            r.blob("cert_pem", MAX_CERT_BYTES),
            r.blob("signature", MAX_SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class KeyRoster(_Message):
    """The coordinator's relay of every advert it accepted (the set U1), sorted by silo id."""

    KIND: ClassVar[int] = 3
    round_id: str
    adverts: tuple[KeyAdvert, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "KeyRoster")
        _check_items(self.adverts, KeyAdvert, "KeyRoster.adverts")
        _check_ids(tuple(a.silo_id for a in self.adverts), "KeyRoster.adverts")

    def silo_ids(self) -> tuple[str, ...]:
        """The advertised silos in roster order."""
        return tuple(a.silo_id for a in self.adverts)

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.uint(len(self.adverts), 4)
        for advert in self.adverts:
            advert._encode(w)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        round_id = r.text("round_id")
        return cls(round_id, tuple(KeyAdvert._decode(r) for _ in range(r.count("adverts"))))


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

    def _encode(self, w: _Writer) -> None:
        w.text(self.sender)
        w.text(self.recipient)
        w.blob(self.nonce)
        w.blob(self.ciphertext)

    @classmethod
    def _decode(cls, r: _Reader) -> EncryptedShare:
        return cls(
            r.text("sender"),
            r.text("recipient"),
            r.blob("nonce", NONCE_BYTES),
            r.blob("ciphertext", CIPHERTEXT_BYTES),
        )


def _decode_shares(r: _Reader) -> tuple[EncryptedShare, ...]:
    return tuple(EncryptedShare._decode(r) for _ in range(r.count("shares")))


@dataclass(frozen=True)
class ShareKeys(_Message):
    """A silo's encrypted shares, one per other advertised silo."""

    KIND: ClassVar[int] = 4
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

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.text(self.sender)
        w.uint(len(self.shares), 4)
        for share in self.shares:
            share._encode(w)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.text("round_id"), r.text("sender"), _decode_shares(r))


@dataclass(frozen=True)
class ShareDelivery(_Message):
    """The shares addressed to one silo from every other silo whose ShareKeys arrived (the set U2)."""

    KIND: ClassVar[int] = 5
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

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.text(self.recipient)
        w.uint(len(self.shares), 4)
        for share in self.shares:
            share._encode(w)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.text("round_id"), r.text("recipient"), _decode_shares(r))


@dataclass(frozen=True)
class MaskedInput(_Message):
    """A silo's masked, quantized vector: raw little-endian ring words."""

    KIND: ClassVar[int] = 6
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

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.text(self.sender)
        w.uint(self.ring_bits, 1)
        w.blob(self.data)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(
            r.text("round_id"), r.text("sender"), r.uint(1, "ring_bits"), r.blob("data", cls.MAX_BYTES)
        )


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """The coordinator's claim of who uploaded (U3) and who dropped after sharing (U2 minus U3)."""

    KIND: ClassVar[int] = 7
    round_id: str
    uploaded: tuple[str, ...]
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "UnmaskRequest")
        _check_ids(self.uploaded, "UnmaskRequest.uploaded")
        _check_ids(self.dropped, "UnmaskRequest.dropped")

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.texts(self.uploaded)
        w.texts(self.dropped)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.text("round_id"), r.texts("uploaded"), r.texts("dropped"))


@dataclass(frozen=True)
class RevealedShare:
    """One Shamir share a survivor reveals, and whose secret it belongs to."""

    peer: str
    share: Share

    def __post_init__(self) -> None:
        _check_silo_id(self.peer, "RevealedShare.peer")
        if not isinstance(self.share, Share):
            raise MessageError("RevealedShare.share: expected a Share")

    def _encode(self, w: _Writer) -> None:
        w.text(self.peer)
        w.uint(self.share.x, 2)
        w.blob(self.share.y_bytes())

    @classmethod
    def _decode(cls, r: _Reader) -> RevealedShare:
        peer, x, y = r.text("peer"), r.uint(2, "x"), r.blob("y", SHARE_BYTES)
        try:
            return cls(peer, Share(x, int.from_bytes(y, "big")))
        except ShamirError as exc:
            raise MessageError(f"{r.message}: share of {peer!r}: {exc}") from exc


def _decode_revealed(r: _Reader, field: str) -> tuple[RevealedShare, ...]:
    return tuple(RevealedShare._decode(r) for _ in range(r.count(field)))


@dataclass(frozen=True)
class UnmaskResponse(_Message):
    """A survivor's shares: self-mask seed shares of uploaders, mask-key shares of dropped silos."""

    KIND: ClassVar[int] = 8
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

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.text(self.sender)
        for group in (self.seed_shares, self.key_shares):
            w.uint(len(group), 4)
            for item in group:
                item._encode(w)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        round_id, sender = r.text("round_id"), r.text("sender")
        return cls(round_id, sender, _decode_revealed(r, "seed_shares"), _decode_revealed(r, "key_shares"))


@dataclass(frozen=True)
class RoundAbort(_Message):
    """The coordinator ends the round without a result; silos discard their round secrets."""

    KIND: ClassVar[int] = 9
    round_id: str
    stage: str
    reason: str

    def __post_init__(self) -> None:
        _check_round_id(self.round_id, "RoundAbort")
        if not isinstance(self.stage, str) or not isinstance(self.reason, str):
            raise MessageError("RoundAbort: stage and reason must be text")
        if len(self.reason.encode()) > MAX_TEXT_BYTES:
            raise MessageError(f"RoundAbort.reason: at most {MAX_TEXT_BYTES} bytes allowed")

    def _encode(self, w: _Writer) -> None:
        w.text(self.round_id)
        w.text(self.stage)
        w.text(self.reason)

    @classmethod
    def _decode(cls, r: _Reader) -> Self:
        return cls(r.text("round_id"), r.text("stage"), r.text("reason"))


Message = (
    RoundConfig
    | KeyAdvert
    | KeyRoster
    | ShareKeys
    | ShareDelivery
    | MaskedInput
    | UnmaskRequest
    | UnmaskResponse
    | RoundAbort
)

_KINDS: dict[int, type[_Message]] = {
    cls.KIND: cls
    for cls in (
        RoundConfig,
        KeyAdvert,
        KeyRoster,
        ShareKeys,
        ShareDelivery,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
        RoundAbort,
    )
}


def decode_message(data: bytes) -> Message:
    """Decode any secure-aggregation message, its type read from the header."""
    kind = _Reader(data, "secure-aggregation message").header(None)
    if kind not in _KINDS:
        raise MessageError(f"secure-aggregation message: unknown kind {kind}")
    return _KINDS[kind].from_bytes(data)  # type: ignore[return-value]


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

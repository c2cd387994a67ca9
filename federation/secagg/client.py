"""A silo's side of one secure-aggregation round, as a state machine fed coordinator messages.

Stages: :meth:`SecAggClient.advertise` -> :meth:`~SecAggClient.share_keys` (roster in) ->
:meth:`~SecAggClient.masked_input` (shares in) -> :meth:`~SecAggClient.unmask` (request in).
Each call returns the message to send. A repeated call with the same input returns the same
message (the transport may retry); a message for another round, or one out of stage order, is
refused without changing state; anything else the protocol forbids (a forged advert, a tampered
share, an inconsistent unmask request, a second different request) aborts the round here, drops
its secrets and raises :class:`ProtocolError`.

Why the unmasking checks suffice: a silo answers exactly one unmask request per round and only
one that accounts for every silo it holds shares of, with at least ``t`` uploaders and no silo
listed as both uploaded and dropped. Recovering both secrets of one silo would need ``t`` answers
naming it uploaded plus ``t`` other answers naming it dropped, i.e. 2t distinct silos, more than
the roster holds since ``t`` is checked to be a strict majority of it.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from typing import cast

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.secagg import shamir
from federation.secagg.messages import (
    KEY_BYTES,
    NONCE_BYTES,
    CertVerifier,
    EncryptedShare,
    IdentityError,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    ProtocolError,
    RevealedShare,
    RoundAbort,
    RoundConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    context_bytes,
)
from federation.secagg.prg import apply_masks, pair_seed
from federation.secagg.quantize import quantize

log = logging.getLogger(__name__)

RandBytes = Callable[[int], bytes]


class ClientStage(enum.Enum):
    """Where a silo stands in a round."""

    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"
    ABORTED = "aborted"


def share_key(
    private_key: X25519PrivateKey, peer_public: bytes, round_id: str, sender: str, recipient: str
) -> tuple[bytes, bytes]:
    """AES-256-GCM key and associated data for the shares ``sender`` encrypts for ``recipient``.

    The direction is part of the binding, so the two silos of a pair never share a key.
    """
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(
            f"round {round_id!r}: X25519 agreement of {sender!r} and {recipient!r} failed"
        ) from exc
    binding = context_bytes("share", round_id, sender, recipient)
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=binding).derive(shared)
    return key, binding


def _public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecAggClient:
    """One silo in one round. Make a new client for every round: keys and seeds are never reused.

    ``signing_key`` is the private key of the silo's certificate ``cert_pem``; ``verify_cert``
    checks peers' certificates against the federation PKI, and this silo's own: one it refuses
    (revoked, expired, not pinned), one of another silo or a key that is not the certificate's
    raises :class:`IdentityError`, as no peer would accept this silo's advert. ``randbytes`` makes
    the X25519 keys, the self-mask seed, Shamir coefficients and GCM nonces: leave it at
    ``os.urandom`` outside tests. ``rounding_seed`` seeds the (non-secret) stochastic rounding.
    """

    def __init__(
        self,
        config: RoundConfig,
        silo_id: str,
        signing_key: ec.EllipticCurvePrivateKey,
        cert_pem: bytes,
        verify_cert: CertVerifier,
        *,
        rounding_seed: int,
        randbytes: RandBytes = os.urandom,
        min_roster: int = 2,
    ) -> None:
        """``min_roster`` is the fewest silos this site will sum with (its policy): a roster that
        shrank below it is refused, since a small sum says more about each of its members."""
        try:
            own_silo = verify_cert(cert_pem)
        except Exception as exc:  # the injected PKI check may raise anything; all of it means "refused"
            raise IdentityError(f"the certificate of silo {silo_id!r} is refused: {exc}") from exc
        if own_silo != silo_id:
            raise IdentityError(f"the certificate is for silo {own_silo!r}, not {silo_id!r}")
        cert_key = x509.load_pem_x509_certificate(cert_pem).public_key()
        if cert_key != signing_key.public_key():
            raise IdentityError(f"the signing key of silo {silo_id!r} is not the key of its certificate")
        self.config = config
        self.silo_id = silo_id
        self._signing_key = signing_key
        self._cert_pem = cert_pem
        self._verify_cert = verify_cert
        self._min_roster = min_roster
        self._randbytes = randbytes
        self._rng = np.random.default_rng(rounding_seed)
        self._stage = ClientStage.NEW
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._seed: bytes | None = None
        self._advert: KeyAdvert | None = None
        self._roster: dict[str, KeyAdvert] = {}
        self._index: dict[str, int] = {}
        self._own_shares: tuple[shamir.Share, shamir.Share] | None = None
        self._peer_shares: dict[str, tuple[shamir.Share, shamir.Share]] = {}
        self._seen: dict[type, tuple[object, object]] = {}

    @property
    def stage(self) -> ClientStage:
        """The stage this silo has reached."""
        return self._stage

    @property
    def round_id(self) -> str:
        """The round this client serves."""
        return self.config.round_id

    # -- helpers -------------------------------------------------------------------------------

    def _refuse(self, message: str) -> ProtocolError:
        log.warning("secagg %s/%s: refused: %s", self.round_id, self.silo_id, message)
        return ProtocolError(f"silo {self.silo_id!r}, round {self.round_id!r}: {message}")

    def _violation(self, message: str) -> ProtocolError:
        self.abort()
        log.warning("secagg %s/%s: aborted: %s", self.round_id, self.silo_id, message)
        return ProtocolError(f"silo {self.silo_id!r}, round {self.round_id!r}: {message}; round aborted")

    def _check_round(self, msg_round: str, what: str) -> None:
        if msg_round != self.round_id:
            raise self._refuse(f"{what} belongs to round {msg_round!r}")

    def _replayed(self, incoming: object) -> object | None:
        """The reply already given to ``incoming``, None if this stage is new; a different input aborts."""
        seen = self._seen.get(type(incoming))
        if seen is None:
            return None
        if seen[0] != incoming:
            raise self._violation(f"got a second, different {type(incoming).__name__} for this round")
        return seen[1]

    def _require_stage(self, stage: ClientStage, what: str) -> None:
        if self._stage is ClientStage.ABORTED:
            raise self._refuse(f"{what} after the round was aborted")
        if self._stage is not stage:
            raise self._refuse(f"{what} arrived in stage {self._stage.value}, expected {stage.value}")

    # -- stages --------------------------------------------------------------------------------

    def advertise(self) -> KeyAdvert:
        """Stage 1: two fresh X25519 key pairs, signed with the certificate key for this round."""
        if self._advert is not None and self._stage is not ClientStage.ABORTED:
            return self._advert
        self._require_stage(ClientStage.NEW, "advertise")
        self._c_key = X25519PrivateKey.from_private_bytes(self._randbytes(KEY_BYTES))
        self._s_key = X25519PrivateKey.from_private_bytes(self._randbytes(KEY_BYTES))
        self._advert = KeyAdvert.signed(
            self.round_id,
            self.silo_id,
            _public_raw(self._c_key),
            _public_raw(self._s_key),
            self._cert_pem,
            self._signing_key,
        )
        self._stage = ClientStage.ADVERTISED
        log.info("secagg %s/%s: keys advertised", self.round_id, self.silo_id)
        return self._advert

    def _check_roster(self, roster: KeyRoster) -> None:
        ids = roster.silo_ids()
        if self.silo_id not in ids:
            raise self._violation("roster does not include this silo")
        t, n = self.config.threshold, len(ids)
        if n < self._min_roster:
            raise self._violation(f"roster has {n} silos; this site sums with at least {self._min_roster}")
        if n < t:
            raise self._violation(f"roster has {n} silos, fewer than the threshold t={t}")
        if 2 * t <= n:
            raise self._violation(f"threshold t={t} is not a strict majority of the {n} advertised silos")
        keys: set[bytes] = set()
        for advert in roster.adverts:
            if advert.round_id != self.round_id:
                raise self._violation(f"advert of {advert.silo_id!r} is for round {advert.round_id!r}")
            if advert.silo_id == self.silo_id and advert != self._advert:
                raise self._violation("roster carries an altered copy of this silo's advert")
            try:
                advert.verify(self._verify_cert)
            except ProtocolError as exc:
                raise self._violation(str(exc)) from exc
            keys.update((advert.c_public, advert.s_public))
        if len(keys) != 2 * n:
            raise self._violation("two adverts in the roster share a public key")

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Stage 2: verify every advert, then Shamir-share the self-mask seed and the mask key.

        Each peer's share pair is encrypted with AES-256-GCM under a key agreed with its
        share-encryption key and bound to the round, this silo and the peer.
        """
        self._check_round(roster.round_id, "KeyRoster")
        replay = self._replayed(roster)
        if replay is not None:
            return cast(ShareKeys, replay)
        self._require_stage(ClientStage.ADVERTISED, "KeyRoster")
        self._check_roster(roster)
        assert self._c_key is not None and self._s_key is not None
        ids = sorted(roster.silo_ids())
        self._roster = {a.silo_id: a for a in roster.adverts}
        self._index = {sid: i + 1 for i, sid in enumerate(ids)}
        xs = [self._index[sid] for sid in ids]
        t = self.config.threshold
        self._seed = self._randbytes(KEY_BYTES)
        seed_shares = shamir.split(self._seed, t, xs, self._randbytes)
        key_shares = shamir.split(self._s_key.private_bytes_raw(), t, xs, self._randbytes)
        encrypted = []
        for sid, seed_share, key_share in zip(ids, seed_shares, key_shares, strict=True):
            if sid == self.silo_id:
                self._own_shares = (seed_share, key_share)
                continue
            key, aad = share_key(self._c_key, self._roster[sid].c_public, self.round_id, self.silo_id, sid)
            plaintext = seed_share.x.to_bytes(2, "big") + seed_share.y_bytes() + key_share.y_bytes()
            nonce = self._randbytes(NONCE_BYTES)
            encrypted.append(
                EncryptedShare(self.silo_id, sid, nonce, AESGCM(key).encrypt(nonce, plaintext, aad))
            )
        reply = ShareKeys(self.round_id, self.silo_id, tuple(encrypted))
        self._seen[KeyRoster] = (roster, reply)
        self._stage = ClientStage.SHARED
        log.info("secagg %s/%s: shares sent to %d peers", self.round_id, self.silo_id, len(encrypted))
        return reply

    def _open(self, item: EncryptedShare) -> tuple[shamir.Share, shamir.Share]:
        assert self._c_key is not None
        if item.sender not in self._roster:
            raise self._violation(f"got shares from {item.sender!r}, who is not in the roster")
        key, aad = share_key(
            self._c_key, self._roster[item.sender].c_public, self.round_id, item.sender, self.silo_id
        )
        try:
            plaintext = AESGCM(key).decrypt(item.nonce, item.ciphertext, aad)
        except InvalidTag as exc:
            raise self._violation(f"shares from {item.sender!r} fail AES-GCM authentication") from exc
        x = int.from_bytes(plaintext[:2], "big")
        if x != self._index[self.silo_id]:
            raise self._violation(f"shares from {item.sender!r} are for point {x}, not this silo's")
        seed_y = plaintext[2 : 2 + shamir.SHARE_BYTES]
        key_y = plaintext[2 + shamir.SHARE_BYTES :]
        try:
            return shamir.Share(x, int.from_bytes(seed_y, "big")), shamir.Share(
                x, int.from_bytes(key_y, "big")
            )
        except shamir.ShamirError as exc:
            raise self._violation(f"shares from {item.sender!r} are malformed: {exc}") from exc

    def masked_input(self, delivery: ShareDelivery, x: np.ndarray) -> MaskedInput:
        """Stage 3: take the peers' shares, then upload q(x) + PRG(b) + signed pairwise masks.

        ``x`` is the float vector to sum (weighted update and per-group weights), of the agreed
        length. Pairwise masks are added for peers ordered before this silo and subtracted for
        those after, so they cancel in the sum over the silos that shared keys.
        """
        self._check_round(delivery.round_id, "ShareDelivery")
        x = np.asarray(x)
        if x.ndim != 1 or x.size != self.config.vector_length:
            raise ValueError(f"input vector must have shape ({self.config.vector_length},), got {x.shape}")
        replay = self._replayed(delivery)
        if replay is not None:
            return cast(MaskedInput, replay)
        self._require_stage(ClientStage.SHARED, "ShareDelivery")
        if delivery.recipient != self.silo_id:
            raise self._violation(f"got the share delivery addressed to {delivery.recipient!r}")
        peers = {item.sender: self._open(item) for item in delivery.shares}
        shared = set(peers) | {self.silo_id}
        if len(shared) < self.config.threshold:
            raise self._violation(
                f"only {len(shared)} silos shared keys, fewer than the threshold t={self.config.threshold}"
            )
        assert self._s_key is not None and self._seed is not None
        masks = [(self._seed, 1)]
        for peer in sorted(peers):
            seed = pair_seed(self._s_key, self._roster[peer].s_public, self.round_id, self.silo_id, peer)
            masks.append((seed, 1 if peer < self.silo_id else -1))
        codes = quantize(x, self.config.quant, self._rng)
        apply_masks(codes, masks)
        reply = MaskedInput(self.round_id, self.silo_id, self.config.quant.ring_bits, codes.tobytes())
        self._peer_shares = peers
        # Agreement keys and the seed are spent; from here on only the shares are needed.
        self._c_key = self._s_key = None
        self._seed = None
        self._seen[ShareDelivery] = (delivery, reply)
        self._stage = ClientStage.MASKED
        log.info(
            "secagg %s/%s: masked input of %d entries with %d peers",
            self.round_id,
            self.silo_id,
            x.size,
            len(peers),
        )
        return reply

    def _check_request(self, request: UnmaskRequest) -> None:
        uploaded, dropped = set(request.uploaded), set(request.dropped)
        shared = set(self._peer_shares) | {self.silo_id}
        both = uploaded & dropped
        if both:
            raise self._violation(f"unmask request lists {sorted(both)} as both uploaded and dropped")
        unknown = (uploaded | dropped) - shared
        if unknown:
            raise self._violation(
                f"unmask request names {sorted(unknown)}, whose shares this silo never received"
            )
        missing = shared - uploaded - dropped
        if missing:
            raise self._violation(f"unmask request does not account for {sorted(missing)}")
        if len(uploaded) < self.config.threshold:
            raise self._violation(
                f"unmask request lists {len(uploaded)} uploaders,"
                f" fewer than the threshold t={self.config.threshold}"
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: reveal the seed share of each uploader and the key share of each dropped silo.

        Answered once per round; the same request again gets the same answer, a different one
        aborts.
        """
        self._check_round(request.round_id, "UnmaskRequest")
        replay = self._replayed(request)
        if replay is not None:
            return cast(UnmaskResponse, replay)
        self._require_stage(ClientStage.MASKED, "UnmaskRequest")
        self._check_request(request)
        assert self._own_shares is not None
        holdings = dict(self._peer_shares)
        holdings[self.silo_id] = self._own_shares
        reply = UnmaskResponse(
            self.round_id,
            self.silo_id,
            tuple(RevealedShare(peer, holdings[peer][0]) for peer in sorted(request.uploaded)),
            tuple(RevealedShare(peer, holdings[peer][1]) for peer in sorted(request.dropped)),
        )
        self._seen[UnmaskRequest] = (request, reply)
        self._stage = ClientStage.DONE
        log.info(
            "secagg %s/%s: revealed %d seed shares and %d key shares",
            self.round_id,
            self.silo_id,
            len(reply.seed_shares),
            len(reply.key_shares),
        )
        return reply

    def abort(self, notice: RoundAbort | None = None) -> None:
        """End the round here and drop every secret (Python cannot scrub memory, only release it)."""
        if notice is not None:
            self._check_round(notice.round_id, "RoundAbort")
            log.info(
                "secagg %s/%s: coordinator aborted the round at %s", self.round_id, self.silo_id, notice.stage
            )
        self._c_key = self._s_key = None
        self._seed = None
        self._own_shares = None
        self._peer_shares = {}
        self._seen = {}
        self._stage = ClientStage.ABORTED

"""The coordinator's side of one secure-aggregation round, as a state machine fed silo messages.

The transport calls ``receive_*`` with each message and the sender's identity as authenticated
by mutual TLS (never a message field), and ``close_*`` when a stage's deadline passes or
:meth:`SecAggServer.pending` is empty. Each ``close_*`` returns the messages for the next stage
or a :class:`RoundAbort` when fewer than ``t`` silos are left; an aborted round sends no unmask
request, so nothing is revealed. :meth:`SecAggServer.finish` reconstructs the self-mask seeds of
uploaders and the mask keys of silos that dropped after sharing, strips all masks and returns
only the float64 sum. The coordinator never holds an individual input in the clear.

Set names follow Bonawitz et al.: U1 advertised keys, U2 sent shares, U3 uploaded a masked input,
U4 answered the unmask request.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from federation import pki
from federation.secagg import shamir
from federation.secagg.messages import (
    CertVerifier,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    ProtocolError,
    RoundAbort,
    RoundConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from federation.secagg.prg import apply_masks, pair_seed
from federation.secagg.quantize import dequantize, ring_dtype

log = logging.getLogger(__name__)


class ServerStage(enum.Enum):
    """Which messages the coordinator is collecting."""

    ADVERTS = "adverts"
    SHARES = "shares"
    MASKED = "masked inputs"
    UNMASK = "unmask responses"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class RoundResult:
    """How a round ended: the float64 sum over ``uploaded`` when completed, else why it aborted."""

    round_id: str
    completed: bool
    total: np.ndarray | None
    uploaded: tuple[str, ...]
    dropped: tuple[str, ...]
    reason: str | None = None


class SecAggServer:
    """The coordinator in one round over the ``selected`` silos; ``config.threshold`` must be a majority."""

    def __init__(self, config: RoundConfig, selected: Sequence[str], verify_cert: CertVerifier) -> None:
        ids = tuple(sorted(selected))
        for sid in ids:
            pki.validate_silo_id(sid)
        if len(set(ids)) != len(ids):
            raise ValueError(f"selected silo ids repeat: {list(selected)}")
        t = config.threshold
        if not len(ids) / 2 < t <= len(ids):
            raise ValueError(
                f"threshold t={t} must be more than half of, and at most, the {len(ids)} selected silos"
            )
        self.config = config
        self.selected = ids
        self._verify_cert = verify_cert
        self._stage = ServerStage.ADVERTS
        self._adverts: dict[str, KeyAdvert] = {}
        self._index: dict[str, int] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._masked: dict[str, MaskedInput] = {}
        self._total: np.ndarray | None = None
        self._uploaded: tuple[str, ...] = ()
        self._dropped: tuple[str, ...] = ()
        self._responses: dict[str, UnmaskResponse] = {}
        self._result: RoundResult | None = None

    @property
    def stage(self) -> ServerStage:
        """The stage being collected."""
        return self._stage

    @property
    def round_id(self) -> str:
        """The round this server runs."""
        return self.config.round_id

    @property
    def result(self) -> RoundResult | None:
        """The outcome once the round completed or aborted."""
        return self._result

    def pending(self) -> tuple[str, ...]:
        """Silos the current stage still waits for; the stage can close early when this is empty."""
        stage = self._stage
        if stage is ServerStage.ADVERTS:
            expected, received = self.selected, set(self._adverts)
        elif stage is ServerStage.SHARES:
            expected, received = tuple(sorted(self._adverts)), set(self._shares)
        elif stage is ServerStage.MASKED:
            expected, received = tuple(sorted(self._shares)), set(self._masked)
        elif stage is ServerStage.UNMASK:
            expected, received = self._uploaded, set(self._responses)
        else:
            return ()
        return tuple(sid for sid in expected if sid not in received)

    # -- helpers -------------------------------------------------------------------------------

    def _require_stage(self, stage: ServerStage, what: str) -> None:
        if self._stage is not stage:
            raise ProtocolError(f"round {self.round_id!r}: {what} while collecting {self._stage.value}")

    def _accept(self, stage: ServerStage, sender: str, msg_round: str, msg_sender: str, what: str) -> None:
        if msg_round != self.round_id:
            raise ProtocolError(
                f"round {self.round_id!r}: {what} from {sender!r} belongs to round {msg_round!r}"
            )
        if msg_sender != sender:
            raise ProtocolError(
                f"round {self.round_id!r}: {what} from {sender!r} claims to come from {msg_sender!r}"
            )
        self._require_stage(stage, f"{what} from {sender!r} arrived")

    @staticmethod
    def _duplicate(store: dict, sender: str, msg: object, what: str) -> bool:
        """True for a retried identical message; a different second message is refused."""
        if sender not in store:
            return False
        if store[sender] != msg:
            raise ProtocolError(f"{what} from {sender!r} differs from the one already received")
        return True

    def _abort(self, reason: str) -> RoundAbort:
        stage = self._stage.value
        self._masked.clear()
        self._total = None
        self._stage = ServerStage.ABORTED
        self._result = RoundResult(self.round_id, False, None, self._uploaded, self._dropped, reason)
        log.warning("secagg %s: aborted while collecting %s: %s", self.round_id, stage, reason)
        return RoundAbort(self.round_id, stage, reason)

    def abort(self, reason: str) -> RoundAbort:
        """End the round now (operator stop, global deadline); no further message is accepted."""
        if self._stage in (ServerStage.DONE, ServerStage.ABORTED):
            raise ProtocolError(f"round {self.round_id!r} already ended ({self._stage.value})")
        return self._abort(reason)

    def _enough(self, n: int, what: str) -> RoundAbort | None:
        t = self.config.threshold
        if n < t:
            return self._abort(f"only {n} silos {what}, fewer than the threshold t={t}")
        return None

    # -- stage 1 -------------------------------------------------------------------------------

    def receive_advert(self, sender: str, advert: KeyAdvert) -> None:
        """Accept a selected silo's signed keys after checking its certificate and signature."""
        self._accept(ServerStage.ADVERTS, sender, advert.round_id, advert.silo_id, "KeyAdvert")
        if sender not in self.selected:
            raise ProtocolError(f"round {self.round_id!r}: {sender!r} was not selected")
        if self._duplicate(self._adverts, sender, advert, "KeyAdvert"):
            return
        advert.verify(self._verify_cert)
        self._adverts[sender] = advert

    def close_adverts(self) -> KeyRoster | RoundAbort:
        """End stage 1: the roster for every advertised silo, or an abort."""
        self._require_stage(ServerStage.ADVERTS, "close_adverts called")
        abort = self._enough(len(self._adverts), "advertised keys")
        if abort is not None:
            return abort
        ids = sorted(self._adverts)
        self._index = {sid: i + 1 for i, sid in enumerate(ids)}
        self._stage = ServerStage.SHARES
        log.info(
            "secagg %s: %d of %d selected silos advertised keys", self.round_id, len(ids), len(self.selected)
        )
        return KeyRoster(self.round_id, tuple(self._adverts[sid] for sid in ids))

    # -- stage 2 -------------------------------------------------------------------------------

    def receive_shares(self, sender: str, msg: ShareKeys) -> None:
        """Accept an advertised silo's encrypted shares, one for every other advertised silo."""
        self._accept(ServerStage.SHARES, sender, msg.round_id, msg.sender, "ShareKeys")
        if sender not in self._adverts:
            raise ProtocolError(f"round {self.round_id!r}: {sender!r} did not advertise keys")
        if self._duplicate(self._shares, sender, msg, "ShareKeys"):
            return
        recipients = {s.recipient for s in msg.shares}
        expected = set(self._adverts) - {sender}
        if recipients != expected:
            raise ProtocolError(
                f"round {self.round_id!r}: ShareKeys from {sender!r} addresses {sorted(recipients)},"
                f" expected {sorted(expected)}"
            )
        self._shares[sender] = msg

    def close_shares(self) -> dict[str, ShareDelivery] | RoundAbort:
        """End stage 2: for each silo that shared (U2), the shares the others addressed to it; or an abort."""
        self._require_stage(ServerStage.SHARES, "close_shares called")
        abort = self._enough(len(self._shares), "sent shares")
        if abort is not None:
            return abort
        inbox: dict[str, list] = {sid: [] for sid in self._shares}
        for sender in sorted(self._shares):
            for item in self._shares[sender].shares:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        self._stage = ServerStage.MASKED
        log.info("secagg %s: %d silos shared keys", self.round_id, len(inbox))
        return {sid: ShareDelivery(self.round_id, sid, tuple(items)) for sid, items in inbox.items()}

    # -- stage 3 -------------------------------------------------------------------------------

    def receive_masked(self, sender: str, msg: MaskedInput) -> None:
        """Accept the masked input of a silo that shared keys."""
        self._accept(ServerStage.MASKED, sender, msg.round_id, msg.sender, "MaskedInput")
        if sender not in self._shares:
            raise ProtocolError(f"round {self.round_id!r}: {sender!r} did not share keys")
        quant, length = self.config.quant, self.config.vector_length
        if msg.ring_bits != quant.ring_bits or msg.length != length:
            raise ProtocolError(
                f"round {self.round_id!r}: MaskedInput from {sender!r} has {msg.length} {msg.ring_bits}-bit"
                f" words, expected {length} {quant.ring_bits}-bit words"
            )
        if self._duplicate(self._masked, sender, msg, "MaskedInput"):
            return
        self._masked[sender] = msg

    def close_masked(self) -> UnmaskRequest | RoundAbort:
        """End stage 3: the unmask request for the uploaders (U3), or an abort that reveals nothing."""
        self._require_stage(ServerStage.MASKED, "close_masked called")
        abort = self._enough(len(self._masked), "uploaded masked inputs")
        if abort is not None:
            return abort
        self._uploaded = tuple(sorted(self._masked))
        self._dropped = tuple(sorted(set(self._shares) - set(self._masked)))
        total = np.zeros(self.config.vector_length, dtype=ring_dtype(self.config.quant.ring_bits))
        for sid in self._uploaded:
            np.add(total, self._masked[sid].values(), out=total)
        self._total = total
        # Only the masked sum is needed from here on.
        self._masked.clear()
        self._stage = ServerStage.UNMASK
        log.info(
            "secagg %s: %d silos uploaded, %d dropped after sharing",
            self.round_id,
            len(self._uploaded),
            len(self._dropped),
        )
        return UnmaskRequest(self.round_id, self._uploaded, self._dropped)

    # -- stage 4 -------------------------------------------------------------------------------

    def receive_unmask(self, sender: str, msg: UnmaskResponse) -> None:
        """Accept an uploader's shares after checking they answer exactly the request sent."""
        self._accept(ServerStage.UNMASK, sender, msg.round_id, msg.sender, "UnmaskResponse")
        if sender not in self._uploaded:
            raise ProtocolError(f"round {self.round_id!r}: {sender!r} was not asked to unmask")
        if self._duplicate(self._responses, sender, msg, "UnmaskResponse"):
            return
        seed_peers = tuple(s.peer for s in msg.seed_shares)
        key_peers = tuple(s.peer for s in msg.key_shares)
        if sorted(seed_peers) != list(self._uploaded) or sorted(key_peers) != list(self._dropped):
            raise ProtocolError(
                f"round {self.round_id!r}: UnmaskResponse from {sender!r} does not answer the request"
                f" (seed shares for {sorted(seed_peers)}, key shares for {sorted(key_peers)})"
            )
        x = self._index[sender]
        if any(s.share.x != x for s in msg.seed_shares + msg.key_shares):
            raise ProtocolError(
                f"round {self.round_id!r}: UnmaskResponse from {sender!r} carries shares for another point"
            )
        self._responses[sender] = msg

    def _recover(self, peer: str, seeds: bool) -> bytes:
        shares = [
            next(s.share for s in (r.seed_shares if seeds else r.key_shares) if s.peer == peer)
            for r in self._responses.values()
        ]
        return shamir.combine(shares, self.config.threshold)

    def finish(self) -> RoundResult:
        """End stage 4: remove every mask from the summed uploads and return the float64 sum, or abort."""
        self._require_stage(ServerStage.UNMASK, "finish called")
        if self._enough(len(self._responses), "answered the unmask request") is not None:
            assert self._result is not None
            return self._result
        masks: list[tuple[bytes, int]] = []
        try:
            for peer in self._uploaded:
                masks.append((self._recover(peer, seeds=True), -1))
            for peer in self._dropped:
                key = X25519PrivateKey.from_private_bytes(self._recover(peer, seeds=False))
                public = key.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
                if public != self._adverts[peer].s_public:
                    raise shamir.ShamirError(f"recovered mask key of {peer!r} does not match its advert")
                for uploader in self._uploaded:
                    # The uploader added this mask if the dropped silo sorts before it, else subtracted it.
                    sign = 1 if peer < uploader else -1
                    seed = pair_seed(key, self._adverts[uploader].s_public, self.round_id, uploader, peer)
                    masks.append((seed, -sign))
        except shamir.ShamirError as exc:
            self._abort(f"unmask shares are inconsistent: {exc}")
            assert self._result is not None
            return self._result
        assert self._total is not None
        total = self._total
        apply_masks(total, masks)
        self._total = None
        self._stage = ServerStage.DONE
        self._result = RoundResult(
            self.round_id, True, dequantize(total, self.config.quant), self._uploaded, self._dropped
        )
        log.info(
            "secagg %s: sum of %d inputs unmasked with %d responses",
            self.round_id,
            len(self._uploaded),
            len(self._responses),
        )
        return self._result

"""Secure-aggregation messages on the gRPC contract: the protocol's own encodings inside the proto fields.

The state machines in :mod:`federation.secagg` speak in their own message types; the federation
contract carries them as opaque bytes next to the ids the coordinator read from certificates.
Each pair of functions here is an exact round trip, and the ``from_proto`` side rebuilds the
protocol message with the ids the transport vouches for, never ids taken from the payload alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg.messages import (
    CIPHERTEXT_BYTES,
    NONCE_BYTES,
    EncryptedShare,
    KeyAdvert,
    KeyRoster,
    MessageError,
    RevealedShare,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from federation.secagg.shamir import SHARE_BYTES, ShamirError, Share


def secure_round_id(run_id: str, round_index: int, attempt: int) -> str:
    """The protocol round id of one round attempt: fresh keys and masks for every attempt."""
    return f"{run_id}/r{round_index}/a{attempt}"


def decode_advert(data: bytes, sender: str) -> KeyAdvert:
    """A silo's AdvertiseKeys payload; its silo id must be the caller's."""
    advert = decode_message(data)
    if not isinstance(advert, KeyAdvert):
        raise MessageError(f"signed_keys: expected a KeyAdvert, got {type(advert).__name__}")
    if advert.silo_id != sender:
        raise MessageError(f"signed_keys: advert names silo {advert.silo_id!r}, the caller is {sender!r}")
    return advert


def roster_to_proto(roster: KeyRoster) -> pb.KeyRoster:
    """The key roster as Task.key_roster."""
    return pb.KeyRoster(
        entries=[
            pb.AdvertisedKeys(silo_id=a.silo_id, certificate_pem=a.cert_pem, signed_keys=a.to_bytes())
            for a in roster.adverts
        ]
    )


def roster_from_proto(round_id: str, message: pb.KeyRoster) -> KeyRoster:
    """Task.key_roster back as the protocol's roster (signatures are checked by the client)."""
    adverts = []
    for entry in message.entries:
        advert = decode_advert(entry.signed_keys, entry.silo_id)
        if advert.cert_pem != entry.certificate_pem:
            raise MessageError(f"key_roster: certificate of {entry.silo_id!r} differs from the one in its advert")
        adverts.append(advert)
    return KeyRoster(round_id, tuple(adverts))


def _pack(share: EncryptedShare) -> bytes:
    return share.nonce + share.ciphertext


def _unpack(sender: str, recipient: str, data: bytes) -> EncryptedShare:
    if len(data) != NONCE_BYTES + CIPHERTEXT_BYTES:
        raise MessageError(
            f"share from {sender!r} to {recipient!r}: {len(data)} bytes, expected {NONCE_BYTES + CIPHERTEXT_BYTES}"
        )
    return EncryptedShare(sender, recipient, data[:NONCE_BYTES], data[NONCE_BYTES:])


def share_keys_to_proto(msg: ShareKeys) -> list[pb.OutgoingShare]:
    """A silo's ShareKeys as ShareKeysRequest.shares."""
    return [pb.OutgoingShare(recipient=s.recipient, ciphertext=_pack(s)) for s in msg.shares]


def share_keys_from_proto(round_id: str, sender: str, shares: Iterable[pb.OutgoingShare]) -> ShareKeys:
    """ShareKeysRequest.shares from the authenticated ``sender``."""
    return ShareKeys(round_id, sender, tuple(_unpack(sender, s.recipient, s.ciphertext) for s in shares))


def delivery_to_proto(delivery: ShareDelivery) -> pb.ShareBundle:
    """The shares addressed to one silo as Task.shares."""
    return pb.ShareBundle(
        shares=[pb.IncomingShare(sender=s.sender, ciphertext=_pack(s)) for s in delivery.shares]
    )


def delivery_from_proto(round_id: str, recipient: str, bundle: pb.ShareBundle) -> ShareDelivery:
    """Task.shares back as the protocol's delivery to ``recipient``."""
    return ShareDelivery(
        round_id, recipient, tuple(_unpack(s.sender, recipient, s.ciphertext) for s in bundle.shares)
    )


def unmask_request_to_proto(request: UnmaskRequest) -> pb.SurvivorList:
    """The coordinator's unmask request as Task.survivors (the uploaders)."""
    return pb.SurvivorList(silo_ids=list(request.uploaded))


def unmask_request_from_proto(
    round_id: str, survivors: pb.SurvivorList, delivery: ShareDelivery
) -> UnmaskRequest:
    """Task.survivors as an unmask request: everyone this silo holds shares of and who did not upload dropped."""
    uploaded = tuple(sorted(survivors.silo_ids))
    shared = {s.sender for s in delivery.shares} | {delivery.recipient}
    return UnmaskRequest(round_id, uploaded, tuple(sorted(shared - set(uploaded))))


def _share_bytes(share: Share) -> bytes:
    return share.x.to_bytes(2, "big") + share.y_bytes()


def _share_from(data: bytes, owner: str) -> Share:
    if len(data) != 2 + SHARE_BYTES:
        raise MessageError(f"revealed share of {owner!r}: {len(data)} bytes, expected {2 + SHARE_BYTES}")
    try:
        return Share(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))
    except ShamirError as exc:
        raise MessageError(f"revealed share of {owner!r}: {exc}") from exc


def unmask_response_to_proto(response: UnmaskResponse) -> list[pb.RevealedShare]:
    """A survivor's revealed shares as UnmaskRequest.shares."""
    seeds = [
        pb.RevealedShare(owner=r.peer, kind=pb.SHARE_KIND_SELF_MASK_SEED, share=_share_bytes(r.share))
        for r in response.seed_shares
    ]
    keys = [
        pb.RevealedShare(owner=r.peer, kind=pb.SHARE_KIND_MASK_KEY, share=_share_bytes(r.share))
        for r in response.key_shares
    ]
    return seeds + keys


def unmask_response_from_proto(round_id: str, sender: str, shares: Iterable[pb.RevealedShare]) -> UnmaskResponse:
    """UnmaskRequest.shares from the authenticated ``sender``; unknown share kinds are refused."""
    seeds, keys = [], []
    for s in shares:
        revealed = RevealedShare(s.owner, _share_from(s.share, s.owner))
        if s.kind == pb.SHARE_KIND_SELF_MASK_SEED:
            seeds.append(revealed)
        elif s.kind == pb.SHARE_KIND_MASK_KEY:
            keys.append(revealed)
        else:
            raise MessageError(f"revealed share of {s.owner!r}: kind {s.kind} is neither seed nor key")
    return UnmaskResponse(round_id, sender, tuple(seeds), tuple(keys))

"""Secure-aggregation messages on the gRPC contract: the protocol's messages as proto fields.

The state machines in :mod:`federation.secagg` speak in their own message types; the federation
contract carries their fields next to the ids the coordinator read from certificates. Each pair
of functions here is an exact round trip, and the ``from_proto`` side rebuilds the protocol
message with the round and the ids the transport vouches for, never ones taken from the payload
alone. What a peer sent is checked against the protocol's bounds (list lengths, key, signature
and certificate sizes) before anything is built from it, and a refusal names the field and the
peer; gRPC's message size limit bounds the whole message before that.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized

from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg.messages import (
    CIPHERTEXT_BYTES,
    KEY_BYTES,
    MAX_CERT_BYTES,
    MAX_SIGNATURE_BYTES,
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
)
from federation.secagg.shamir import MAX_SHARES, SHARE_BYTES, ShamirError, Share

# The byte fields of a key advert as AdvertiseKeysRequest and AdvertisedKeys both name them, with
# the most bytes each may hold and whether it must hold exactly that many.
_ADVERT_SIZES = (
    ("encryption_public_key", KEY_BYTES, True),
    ("mask_public_key", KEY_BYTES, True),
    ("signature", MAX_SIGNATURE_BYTES, False),
    ("certificate_pem", MAX_CERT_BYTES, False),
)


def secure_round_id(run_id: str, round_index: int, attempt: int) -> str:
    """The protocol round id of one round attempt: fresh keys and masks for every attempt."""
    return f"{run_id}/r{round_index}/a{attempt}"


def _check_count(items: Sized, where: str) -> None:
    """Refuse a list longer than any round can have, before anything is built from its entries."""
    if len(items) > MAX_SHARES:
        raise MessageError(f"{where}: at most {MAX_SHARES} entries allowed, got {len(items)}")


def _advert_fields(advert: KeyAdvert) -> dict[str, bytes]:
    """The advert's fields under the names AdvertiseKeysRequest and AdvertisedKeys give them."""
    return {
        "encryption_public_key": advert.c_public,
        "mask_public_key": advert.s_public,
        "signature": advert.signature,
        "certificate_pem": advert.cert_pem,
    }


def _advert_from(round_id: str, silo_id: str, fields: pb.AdvertiseKeysRequest | pb.AdvertisedKeys) -> KeyAdvert:
    """The advert of ``silo_id`` for ``round_id`` from its proto fields, sizes checked first."""
    where = f"key advert of {silo_id!r}"
    for name, most, exact in _ADVERT_SIZES:
        size = len(getattr(fields, name))
        if exact and size != most:
            raise MessageError(f"{where}: {name} must be {most} bytes, got {size}")
        if size > most:
            raise MessageError(f"{where}: {name} may hold at most {most} bytes, got {size}")
    try:
        return KeyAdvert(
            round_id,
            silo_id,
            fields.encryption_public_key,
            fields.mask_public_key,
            fields.certificate_pem,
            fields.signature,
        )
    except MessageError as exc:
        raise MessageError(f"{where}: {exc}") from exc


def advert_to_proto(ref: pb.StageRef, advert: KeyAdvert) -> pb.AdvertiseKeysRequest:
    """A silo's key advert as its AdvertiseKeys request for the task ``ref``."""
    return pb.AdvertiseKeysRequest(ref=ref, **_advert_fields(advert))


def advert_from_proto(round_id: str, sender: str, request: pb.AdvertiseKeysRequest) -> KeyAdvert:
    """AdvertiseKeysRequest from the authenticated ``sender`` as its advert for ``round_id``.

    The round and the silo id are not in the request: a silo that signed for other ones fails
    the signature check of the protocol server.
    """
    return _advert_from(round_id, sender, request)


def roster_to_proto(roster: KeyRoster) -> pb.KeyRoster:
    """The key roster as Task.key_roster."""
    return pb.KeyRoster(
        entries=[pb.AdvertisedKeys(silo_id=a.silo_id, **_advert_fields(a)) for a in roster.adverts]
    )


def roster_from_proto(round_id: str, message: pb.KeyRoster) -> KeyRoster:
    """Task.key_roster back as the protocol's roster (signatures are checked by the client)."""
    _check_count(message.entries, "key_roster.entries")
    return KeyRoster(round_id, tuple(_advert_from(round_id, e.silo_id, e) for e in message.entries))


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


def share_keys_from_proto(round_id: str, sender: str, shares: Sequence[pb.OutgoingShare]) -> ShareKeys:
    """ShareKeysRequest.shares from the authenticated ``sender``."""
    _check_count(shares, f"shares from {sender!r}")
    return ShareKeys(round_id, sender, tuple(_unpack(sender, s.recipient, s.ciphertext) for s in shares))


def delivery_to_proto(delivery: ShareDelivery) -> pb.ShareBundle:
    """The shares addressed to one silo as Task.shares."""
    return pb.ShareBundle(
        shares=[pb.IncomingShare(sender=s.sender, ciphertext=_pack(s)) for s in delivery.shares]
    )


def delivery_from_proto(round_id: str, recipient: str, bundle: pb.ShareBundle) -> ShareDelivery:
    """Task.shares back as the protocol's delivery to ``recipient``."""
    _check_count(bundle.shares, f"shares for {recipient!r}")
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
    _check_count(survivors.silo_ids, "survivors.silo_ids")
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


def unmask_response_from_proto(round_id: str, sender: str, shares: Sequence[pb.RevealedShare]) -> UnmaskResponse:
    """UnmaskRequest.shares from the authenticated ``sender``; unknown share kinds are refused."""
    _check_count(shares, f"revealed shares from {sender!r}")
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

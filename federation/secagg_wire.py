"""Secure-aggregation messages on the gRPC contract: the protocol's messages as proto fields.

The state machines in :mod:`federation.secagg` speak in their own message types; the federation
contract carries their fields next to the ids the coordinator read from certificates. Each pair
of functions here is an exact round trip, and the ``from_proto`` side rebuilds the protocol
message with the round and the ids the transport vouches for, never ones taken from the payload
alone. What a peer sent is checked against the protocol's bounds (list lengths here; key,
signature, certificate and share sizes in :mod:`federation.messages`, whose builders the
coordinator also uses) before anything is built from it, and a refusal names the field and the
peer; gRPC's message size limit bounds the whole message before that.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized

from federation.messages import (
    OutgoingShare,
    RevealedShareBytes,
    ShareKind,
    SignedKeys,
    encrypted_share,
    key_advert,
    share_keys,
    unmask_response,
)
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg.messages import (
    EncryptedShare,
    KeyAdvert,
    KeyRoster,
    MessageError,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from federation.secagg.shamir import MAX_SHARES, Share


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


def signed_keys_from_proto(fields: pb.AdvertiseKeysRequest | pb.AdvertisedKeys) -> SignedKeys:
    """The key fields of an AdvertiseKeys request or of a roster entry, as sent (unchecked)."""
    return SignedKeys(
        fields.encryption_public_key, fields.mask_public_key, fields.signature, fields.certificate_pem
    )


def advert_to_proto(ref: pb.StageRef, advert: KeyAdvert) -> pb.AdvertiseKeysRequest:
    """A silo's key advert as its AdvertiseKeys request for the task ``ref``."""
    return pb.AdvertiseKeysRequest(ref=ref, **_advert_fields(advert))


def advert_from_proto(round_id: str, sender: str, request: pb.AdvertiseKeysRequest) -> KeyAdvert:
    """AdvertiseKeysRequest from the authenticated ``sender`` as its advert for ``round_id``.

    The round and the silo id are not in the request: a silo that signed for other ones fails
    the signature check of the protocol server.
    """
    return key_advert(round_id, sender, signed_keys_from_proto(request))


def roster_to_proto(roster: KeyRoster) -> pb.KeyRoster:
    """The key roster as Task.key_roster."""
    return pb.KeyRoster(
        entries=[pb.AdvertisedKeys(silo_id=a.silo_id, **_advert_fields(a)) for a in roster.adverts]
    )


def roster_from_proto(round_id: str, message: pb.KeyRoster) -> KeyRoster:
    """Task.key_roster back as the protocol's roster (signatures are checked by the client)."""
    _check_count(message.entries, "key_roster.entries")
    return KeyRoster(
        round_id, tuple(key_advert(round_id, e.silo_id, signed_keys_from_proto(e)) for e in message.entries)
    )


def _pack(share: EncryptedShare) -> bytes:
    return share.nonce + share.ciphertext


def share_keys_to_proto(msg: ShareKeys) -> list[pb.OutgoingShare]:
    """A silo's ShareKeys as ShareKeysRequest.shares."""
    return [pb.OutgoingShare(recipient=s.recipient, ciphertext=_pack(s)) for s in msg.shares]


def outgoing_shares_from_proto(shares: Sequence[pb.OutgoingShare], where: str) -> tuple[OutgoingShare, ...]:
    """ShareKeysRequest.shares as sent; a list longer than any round can have is refused unread."""
    _check_count(shares, where)
    return tuple(OutgoingShare(s.recipient, s.ciphertext) for s in shares)


def share_keys_from_proto(round_id: str, sender: str, shares: Sequence[pb.OutgoingShare]) -> ShareKeys:
    """ShareKeysRequest.shares from the authenticated ``sender``."""
    return share_keys(round_id, sender, outgoing_shares_from_proto(shares, f"shares from {sender!r}"))


def delivery_to_proto(delivery: ShareDelivery) -> pb.ShareBundle:
    """The shares addressed to one silo as Task.shares."""
    return pb.ShareBundle(
        shares=[pb.IncomingShare(sender=s.sender, ciphertext=_pack(s)) for s in delivery.shares]
    )


def delivery_from_proto(round_id: str, recipient: str, bundle: pb.ShareBundle) -> ShareDelivery:
    """Task.shares back as the protocol's delivery to ``recipient``."""
    _check_count(bundle.shares, f"shares for {recipient!r}")
    return ShareDelivery(
        round_id, recipient, tuple(encrypted_share(s.sender, recipient, s.ciphertext) for s in bundle.shares)
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


def revealed_shares_from_proto(shares: Sequence[pb.RevealedShare], where: str) -> tuple[RevealedShareBytes, ...]:
    """UnmaskRequest.shares as sent; a list longer than any round can have, or a share kind the
    protocol does not have, is refused."""
    _check_count(shares, where)
    revealed = []
    for s in shares:
        try:
            kind = ShareKind(s.kind)
        except ValueError:
            raise MessageError(f"revealed share of {s.owner!r}: kind {s.kind} is neither seed nor key") from None
        revealed.append(RevealedShareBytes(s.owner, kind, s.share))
    return tuple(revealed)


def unmask_response_from_proto(round_id: str, sender: str, shares: Sequence[pb.RevealedShare]) -> UnmaskResponse:
    """UnmaskRequest.shares from the authenticated ``sender``; shares of neither kind are refused."""
    return unmask_response(round_id, sender, revealed_shares_from_proto(shares, f"revealed shares from {sender!r}"))

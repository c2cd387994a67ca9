"""What crosses the coordinator's gRPC boundary, as plain Python values: its calls' requests and replies.

:mod:`coordinator.servicer` turns each protobuf request into one of these with :mod:`federation.serde`
and each reply back, so the :class:`~coordinator.server.Coordinator` and its parts never see a
protobuf message. The types reuse what the protocol already names in Python: a :class:`StageKey`
for every ``StageRef``, :class:`~federation.wire.Manifest` and :class:`~federation.wire.Chunk` for
tensor streams, :class:`~condi_models.data.dataset.DatasetInfo` for a silo's data layout,
:mod:`federation.settings` for the JSON documents and :mod:`federation.secagg` for the stage inputs
of secure aggregation. The enums' numbers are the proto's (a test holds them equal), as
:class:`~federation.stages.Stage`'s are.

The secure-aggregation requests carry their fields as the silo sent them, unchecked: the protocol
message they make is bound to the round the coordinator is running, and a call for the wrong
stage or in a plain run is refused as such before its fields are judged. The functions at the end
build those messages, each field's size checked first, and name the field and the peer when they
refuse.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from condi_models.data.dataset import DatasetInfo
from federation import wire
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
from federation.secagg.shamir import SHARE_BYTES, ShamirError, Share
from federation.settings import RoundSettings, RunSettings
from federation.stages import StageKey


class AggregationMode(enum.IntEnum):
    """How a round's updates are combined."""

    UNSPECIFIED = 0
    PLAIN = 1
    SECURE = 2


class UpdateEncoding(enum.IntEnum):
    """How the payload of an upload is to be read: a plain update or a masked vector."""

    UNSPECIFIED = 0
    PLAIN = 1
    MASKED = 2


class ShareKind(enum.IntEnum):
    """Which secret a revealed share reconstructs."""

    UNSPECIFIED = 0
    SELF_MASK_SEED = 1
    MASK_KEY = 2


# ---- Join, GetTask, DownloadState, Heartbeat ------------------------------------------------------


@dataclass(frozen=True)
class JoinRequest:
    """A silo's handshake. Its data summary arrives already read: as ``layout`` when it describes a
    layout within the federation's limits, else ``layout_refusal`` says why not (the coordinator
    answers that in its reply, after the version check)."""

    protocol_version: int
    software_version: str
    capabilities: tuple[str, ...]
    layout: DatasetInfo | None
    layout_refusal: str = ""


@dataclass(frozen=True)
class JoinReply:
    """The coordinator's answer to a Join: refused with a reason, or the run's settings."""

    accepted: bool
    silo_id: str
    federation_name: str
    run_id: str
    protocol_version: int
    software_version: str
    capabilities: tuple[str, ...]
    poll_interval_ms: int
    max_chunk_bytes: int
    rounds: int
    silos_per_round: int
    allowed_silos: int
    reason: str = ""
    # Set when accepted: the model, training, evaluation and layout every silo of the run uses.
    settings: RunSettings | None = None


@dataclass(frozen=True)
class TaskRequest:
    """A GetTask call: the task the silo last acted on (None on its first call) and how long the
    coordinator may hold the call while that task is unchanged."""

    last: StageKey | None
    wait_ms: int


@dataclass(frozen=True)
class Task:
    """What a silo is to do now."""

    key: StageKey
    remaining_ms: int
    poll_after_ms: int
    message: str
    state_sha256: str
    aggregation: AggregationMode
    selected: tuple[str, ...]
    # The round's settings, for the tasks that download the global state.
    settings: RoundSettings | None = None
    # Secure aggregation: how many silos must reach unmasking; 0 outside a secure attempt.
    threshold: int = 0
    # What a secure stage needs from the one before: the roster, the silo's shares or the survivors.
    stage_input: KeyRoster | ShareDelivery | UnmaskRequest | None = None


@dataclass(frozen=True)
class DownloadRequest:
    """A DownloadState call: the task it belongs to, the state wanted, the first chunk to send."""

    key: StageKey
    state_sha256: str
    first_chunk: int


# A download streams the manifest first, then the chunks.
StatePart = wire.Manifest | wire.Chunk


@dataclass(frozen=True)
class HeartbeatRequest:
    """A sign of life: status text and progress for the operator, and ``leaving`` (non-empty) when
    the silo leaves the run for good."""

    status: str
    progress: float
    leaving: str


@dataclass(frozen=True)
class HeartbeatReply:
    """Who the coordinator thinks is calling, and that silo's current task (None before it joined
    or once it left)."""

    silo_id: str
    current: StageKey | None = None


# ---- Submissions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateHeader:
    """The first message of an upload: what the payload is, for which task, from which state."""

    key: StageKey
    encoding: UpdateEncoding
    manifest: wire.Manifest
    base_state_sha256: str
    num_examples: int
    claims_json: str


# An upload streams its header first, then the payload's chunks.
UploadPart = UpdateHeader | wire.Chunk


@dataclass(frozen=True)
class UploadReceipt:
    """An accepted upload: its task, the payload's SHA-256 as reassembled, and whether it repeated
    an accepted one."""

    key: StageKey
    payload_sha256: str
    duplicate: bool


@dataclass(frozen=True)
class Receipt:
    """An accepted submission other than an upload, and whether it repeated an accepted one."""

    key: StageKey
    duplicate: bool


@dataclass(frozen=True)
class MetricsReport:
    """A silo's evaluation (EVALUATE) or data statistics (STATISTICS) as JSON."""

    key: StageKey
    metrics_json: str


@dataclass(frozen=True)
class SignedKeys:
    """A silo's key advert as sent, before the round and the sender's id are bound to it."""

    encryption_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    certificate_pem: bytes


@dataclass(frozen=True)
class OutgoingShare:
    """One encrypted share pair as sent, for ``recipient``."""

    recipient: str
    ciphertext: bytes


@dataclass(frozen=True)
class RevealedShareBytes:
    """One revealed share as sent: whose secret, which one, the encoded share."""

    owner: str
    kind: ShareKind
    share: bytes


@dataclass(frozen=True)
class AdvertiseKeysRequest:
    """Secure aggregation stage 1. ``digest`` identifies the request as sent, so a retry repeats it."""

    key: StageKey
    keys: SignedKeys
    digest: str


@dataclass(frozen=True)
class ShareKeysRequest:
    """Secure aggregation stage 2: one share per peer. ``digest`` as in :class:`AdvertiseKeysRequest`."""

    key: StageKey
    shares: tuple[OutgoingShare, ...]
    digest: str


@dataclass(frozen=True)
class RevealSharesRequest:
    """Secure aggregation stage 4 (the Unmask call, named apart from the protocol's
    :class:`~federation.secagg.UnmaskRequest` that asks for it). ``digest`` as in
    :class:`AdvertiseKeysRequest`."""

    key: StageKey
    shares: tuple[RevealedShareBytes, ...]
    digest: str


SecureRequest = AdvertiseKeysRequest | ShareKeysRequest | RevealSharesRequest


# ---- The protocol messages the secure requests make ------------------------------------------------

# The byte fields of a key advert, with the most bytes each may hold and whether it must hold
# exactly that many.
_ADVERT_SIZES = (
    ("encryption_public_key", KEY_BYTES, True),
    ("mask_public_key", KEY_BYTES, True),
    ("signature", MAX_SIGNATURE_BYTES, False),
    ("certificate_pem", MAX_CERT_BYTES, False),
)


def key_advert(round_id: str, silo_id: str, keys: SignedKeys) -> KeyAdvert:
    """The advert of ``silo_id`` for ``round_id``, each field's size checked before it is built.

    The round and the silo id are not in what the silo sent: one that signed for other ones fails
    the advert's signature check.
    """
    where = f"key advert of {silo_id!r}"
    for name, most, exact in _ADVERT_SIZES:
        size = len(getattr(keys, name))
        if exact and size != most:
            raise MessageError(f"{where}: {name} must be {most} bytes, got {size}")
        if size > most:
            raise MessageError(f"{where}: {name} may hold at most {most} bytes, got {size}")
    try:
        return KeyAdvert(
            round_id, silo_id, keys.encryption_public_key, keys.mask_public_key, keys.certificate_pem, keys.signature
        )
    except MessageError as exc:
        raise MessageError(f"{where}: {exc}") from exc


def encrypted_share(sender: str, recipient: str, data: bytes) -> EncryptedShare:
    """An encrypted share pair from its bytes on the wire (the nonce, then the ciphertext)."""
    if len(data) != NONCE_BYTES + CIPHERTEXT_BYTES:
        raise MessageError(
            f"share from {sender!r} to {recipient!r}: {len(data)} bytes, expected {NONCE_BYTES + CIPHERTEXT_BYTES}"
        )
    return EncryptedShare(sender, recipient, data[:NONCE_BYTES], data[NONCE_BYTES:])


def share_keys(round_id: str, sender: str, shares: Sequence[OutgoingShare]) -> ShareKeys:
    """The ShareKeys message of ``sender`` for ``round_id``."""
    return ShareKeys(round_id, sender, tuple(encrypted_share(sender, s.recipient, s.ciphertext) for s in shares))


def _share_from(data: bytes, owner: str) -> Share:
    if len(data) != 2 + SHARE_BYTES:
        raise MessageError(f"revealed share of {owner!r}: {len(data)} bytes, expected {2 + SHARE_BYTES}")
    try:
        return Share(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))
    except ShamirError as exc:
        raise MessageError(f"revealed share of {owner!r}: {exc}") from exc


def unmask_response(round_id: str, sender: str, shares: Sequence[RevealedShareBytes]) -> UnmaskResponse:
    """The UnmaskResponse of ``sender`` for ``round_id``; a share of neither kind is refused."""
    seeds, keys = [], []
    for s in shares:
        revealed = RevealedShare(s.owner, _share_from(s.share, s.owner))
        if s.kind == ShareKind.SELF_MASK_SEED:
            seeds.append(revealed)
        elif s.kind == ShareKind.MASK_KEY:
            keys.append(revealed)
        else:
            raise MessageError(f"revealed share of {s.owner!r}: kind {int(s.kind)} is neither seed nor key")
    return UnmaskResponse(round_id, sender, tuple(seeds), tuple(keys))

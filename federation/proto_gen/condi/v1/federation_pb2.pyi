from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_WAIT: _ClassVar[Stage]
    STAGE_TRAIN: _ClassVar[Stage]
    STAGE_ADVERTISE_KEYS: _ClassVar[Stage]
    STAGE_SHARE_KEYS: _ClassVar[Stage]
    STAGE_MASKED_INPUT: _ClassVar[Stage]
    STAGE_UNMASK: _ClassVar[Stage]
    STAGE_EVALUATE: _ClassVar[Stage]
    STAGE_DONE: _ClassVar[Stage]
    STAGE_STATISTICS: _ClassVar[Stage]

class AggregationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_MODE_UNSPECIFIED: _ClassVar[AggregationMode]
    AGGREGATION_MODE_PLAIN: _ClassVar[AggregationMode]
    AGGREGATION_MODE_SECURE: _ClassVar[AggregationMode]

class UpdateEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_ENCODING_UNSPECIFIED: _ClassVar[UpdateEncoding]
    UPDATE_ENCODING_PLAIN: _ClassVar[UpdateEncoding]
    UPDATE_ENCODING_MASKED: _ClassVar[UpdateEncoding]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_MASK_SEED: _ClassVar[ShareKind]
    SHARE_KIND_MASK_KEY: _ClassVar[ShareKind]
STAGE_UNSPECIFIED: Stage
STAGE_WAIT: Stage
STAGE_TRAIN: Stage
STAGE_ADVERTISE_KEYS: Stage
STAGE_SHARE_KEYS: Stage
STAGE_MASKED_INPUT: Stage
STAGE_UNMASK: Stage
STAGE_EVALUATE: Stage
STAGE_DONE: Stage
STAGE_STATISTICS: Stage
AGGREGATION_MODE_UNSPECIFIED: AggregationMode
AGGREGATION_MODE_PLAIN: AggregationMode
AGGREGATION_MODE_SECURE: AggregationMode
UPDATE_ENCODING_UNSPECIFIED: UpdateEncoding
UPDATE_ENCODING_PLAIN: UpdateEncoding
UPDATE_ENCODING_MASKED: UpdateEncoding
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_MASK_SEED: ShareKind
SHARE_KIND_MASK_KEY: ShareKind

class StageRef(_message.Message):
    __slots__ = ("run_id", "round", "attempt", "stage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    attempt: int
    stage: Stage
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., stage: _Optional[_Union[Stage, str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "total", "data", "sha256", "payload_sha256")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    index: int
    total: int
    data: bytes
    sha256: str
    payload_sha256: str
    def __init__(self, index: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., payload_sha256: _Optional[str] = ...) -> None: ...

class ModalitySummary(_message.Message):
    __slots__ = ("name", "channels", "channel_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    channels: int
    channel_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., channel_names: _Optional[_Iterable[str]] = ...) -> None: ...

class DataSummary(_message.Message):
    __slots__ = ("dataset", "sampling_rate_hz", "length", "modalities", "classes", "task")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    sampling_rate_hz: float
    length: int
    modalities: _containers.RepeatedCompositeFieldContainer[ModalitySummary]
    classes: _containers.RepeatedScalarFieldContainer[str]
    task: str
    def __init__(self, dataset: _Optional[str] = ..., sampling_rate_hz: _Optional[float] = ..., length: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[ModalitySummary, _Mapping]]] = ..., classes: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "software_version", "capabilities", "data")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    software_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    data: DataSummary
    def __init__(self, protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., data: _Optional[_Union[DataSummary, _Mapping]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("accepted", "reason", "silo_id", "federation_name", "run_id", "protocol_version", "software_version", "capabilities", "model_config_json", "poll_interval_ms", "max_chunk_bytes", "rounds", "silos_per_round", "allowed_silos")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SILOS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_SILOS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    silo_id: str
    federation_name: str
    run_id: str
    protocol_version: int
    software_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    model_config_json: str
    poll_interval_ms: int
    max_chunk_bytes: int
    rounds: int
    silos_per_round: int
    allowed_silos: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., silo_id: _Optional[str] = ..., federation_name: _Optional[str] = ..., run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., model_config_json: _Optional[str] = ..., poll_interval_ms: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., rounds: _Optional[int] = ..., silos_per_round: _Optional[int] = ..., allowed_silos: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("ref", "wait_ms")
    REF_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    wait_ms: int
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class AdvertisedKeys(_message.Message):
    __slots__ = ("silo_id", "certificate_pem", "encryption_public_key", "mask_public_key", "signature")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    certificate_pem: bytes
    encryption_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    def __init__(self, silo_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class KeyRoster(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AdvertisedKeys]
    def __init__(self, entries: _Optional[_Iterable[_Union[AdvertisedKeys, _Mapping]]] = ...) -> None: ...

class IncomingShare(_message.Message):
    __slots__ = ("sender", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareBundle(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[IncomingShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[IncomingShare, _Mapping]]] = ...) -> None: ...

class SurvivorList(_message.Message):
    __slots__ = ("silo_ids",)
    SILO_IDS_FIELD_NUMBER: _ClassVar[int]
    silo_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, silo_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("ref", "remaining_ms", "poll_after_ms", "message", "state_sha256", "round_config_json", "aggregation", "threshold", "selected", "key_roster", "shares", "survivors")
    REF_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    POLL_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    KEY_ROSTER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    remaining_ms: int
    poll_after_ms: int
    message: str
    state_sha256: str
    round_config_json: str
    aggregation: AggregationMode
    threshold: int
    selected: _containers.RepeatedScalarFieldContainer[str]
    key_roster: KeyRoster
    shares: ShareBundle
    survivors: SurvivorList
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., remaining_ms: _Optional[int] = ..., poll_after_ms: _Optional[int] = ..., message: _Optional[str] = ..., state_sha256: _Optional[str] = ..., round_config_json: _Optional[str] = ..., aggregation: _Optional[_Union[AggregationMode, str]] = ..., threshold: _Optional[int] = ..., selected: _Optional[_Iterable[str]] = ..., key_roster: _Optional[_Union[KeyRoster, _Mapping]] = ..., shares: _Optional[_Union[ShareBundle, _Mapping]] = ..., survivors: _Optional[_Union[SurvivorList, _Mapping]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("ref", "state_sha256", "first_chunk")
    REF_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    state_sha256: str
    first_chunk: int
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., state_sha256: _Optional[str] = ..., first_chunk: _Optional[int] = ...) -> None: ...

class StatePart(_message.Message):
    __slots__ = ("manifest_json", "chunk")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    chunk: Chunk
    def __init__(self, manifest_json: _Optional[str] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("ref", "encoding", "manifest_json", "base_state_sha256", "num_examples", "claims_json")
    REF_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    BASE_STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    encoding: UpdateEncoding
    manifest_json: str
    base_state_sha256: str
    num_examples: int
    claims_json: str
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., encoding: _Optional[_Union[UpdateEncoding, str]] = ..., manifest_json: _Optional[str] = ..., base_state_sha256: _Optional[str] = ..., num_examples: _Optional[int] = ..., claims_json: _Optional[str] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("ref", "payload_sha256", "duplicate")
    REF_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    payload_sha256: str
    duplicate: bool
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., payload_sha256: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("ref", "duplicate")
    REF_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    duplicate: bool
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("ref", "encryption_public_key", "mask_public_key", "signature", "certificate_pem")
    REF_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    encryption_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    certificate_pem: bytes
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class OutgoingShare(_message.Message):
    __slots__ = ("recipient", "ciphertext")
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    recipient: str
    ciphertext: bytes
    def __init__(self, recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("ref", "shares")
    REF_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    shares: _containers.RepeatedCompositeFieldContainer[OutgoingShare]
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[OutgoingShare, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: ShareKind
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("ref", "shares")
    REF_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("ref", "metrics_json", "secure_sum")
    REF_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    SECURE_SUM_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    metrics_json: str
    secure_sum: bytes
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., metrics_json: _Optional[str] = ..., secure_sum: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("ref", "status", "progress", "leaving")
    REF_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    ref: StageRef
    status: str
    progress: float
    leaving: str
    def __init__(self, ref: _Optional[_Union[StageRef, _Mapping]] = ..., status: _Optional[str] = ..., progress: _Optional[float] = ..., leaving: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("silo_id", "current")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    current: StageRef
    def __init__(self, silo_id: _Optional[str] = ..., current: _Optional[_Union[StageRef, _Mapping]] = ...) -> None: ...

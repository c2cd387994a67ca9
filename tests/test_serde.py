"""The coordinator's calls between protobuf and domain types: what the silo sends reads back as
meant, what the coordinator answers reads back on the silo's side, and a field the protocol cannot
mean is refused naming it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from condi_models.evaluation import EvalOptions
from condi_models.nn.config import ModelConfig
from condi_models.training import LocalTrainingConfig
from federation import messages as msg
from federation import secagg_wire as sw
from federation import serde, wire
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg import MessageError, ShareDelivery, UnmaskRequest
from federation.secagg.messages import CIPHERTEXT_BYTES, NONCE_BYTES, EncryptedShare
from federation.secagg.shamir import MAX_SHARES
from federation.settings import RoundSettings, RunSettings
from federation.stages import Stage, StageKey
from federation.transfer import (
    LayoutLimits,
    StateDownload,
    TransferError,
    data_summary,
    encode_plain_update,
    receive_upload,
    stage_key,
    stage_ref,
    state_part,
    update_parts,
)
from tests.helpers import toy_dataset

KEY = StageKey("run-a", 2, 1, Stage.TRAIN)
INFO = toy_dataset(4, modalities=(1, 2), length=30, n_classes=3).info
PARAMS = {"w": np.arange(40, dtype=np.float32).reshape(8, 5)}


@pytest.mark.parametrize(
    ("domain", "proto", "prefix"),
    [
        (msg.AggregationMode, pb.AggregationMode, "AGGREGATION_MODE_"),
        (msg.UpdateEncoding, pb.UpdateEncoding, "UPDATE_ENCODING_"),
        (msg.ShareKind, pb.ShareKind, "SHARE_KIND_"),
    ],
)
def test_the_domain_enums_are_the_protocols(domain, proto, prefix: str) -> None:
    assert {m.name: int(m) for m in domain} == {proto.Name(v).removeprefix(prefix): v for v in proto.values()}


def test_a_join_request_reads_the_silos_layout_or_says_why_not() -> None:
    request = pb.JoinRequest(
        protocol_version=1, software_version="0.3", capabilities=["secure-aggregation"], data=data_summary(INFO)
    )
    assert serde.join_request_from_proto(request, LayoutLimits()) == msg.JoinRequest(
        protocol_version=1, software_version="0.3", capabilities=("secure-aggregation",), layout=INFO
    )
    # Past the federation's limits, the summary is not read into a layout; the refusal says why.
    narrow = serde.join_request_from_proto(request, LayoutLimits(max_modalities=1))
    assert narrow.layout is None
    assert narrow.layout_refusal == "data summary: 2 modalities, this federation takes at most 1"
    empty = serde.join_request_from_proto(pb.JoinRequest(protocol_version=1), LayoutLimits())
    assert empty.layout is None and empty.layout_refusal == "data summary: no modalities"


def test_a_join_reply_reads_back_with_the_run_settings_or_the_reason() -> None:
    settings = RunSettings(
        model=ModelConfig.for_dataset(INFO),
        training=LocalTrainingConfig(epochs_a=2, window=30),
        evaluation=EvalOptions(steps=3),
        layout=INFO,
    )
    reply = msg.JoinReply(
        accepted=True,
        silo_id="silo-1",
        federation_name="fed",
        run_id="run-a",
        protocol_version=1,
        software_version="0.3",
        capabilities=("plain-aggregation", "secure-aggregation"),
        poll_interval_ms=100,
        max_chunk_bytes=65536,
        rounds=5,
        silos_per_round=3,
        allowed_silos=4,
        settings=settings,
    )
    message = serde.join_reply_to_proto(reply)
    assert message.accepted and message.reason == "" and RunSettings.from_json(message.model_config_json) == settings
    assert (message.silo_id, message.run_id) == ("silo-1", "run-a")
    assert list(message.capabilities) == list(reply.capabilities)
    assert (message.max_chunk_bytes, message.rounds, message.silos_per_round, message.allowed_silos) == (65536, 5, 3, 4)
    refused = serde.join_reply_to_proto(dataclasses.replace(reply, accepted=False, reason="no", settings=None))
    assert not refused.accepted and refused.reason == "no" and refused.model_config_json == ""


def test_a_task_reads_back_on_the_silos_side_with_its_stage_input() -> None:
    round_id = sw.secure_round_id("run-a", 2, 1)
    share = EncryptedShare("silo-2", "silo-1", bytes(NONCE_BYTES), bytes(CIPHERTEXT_BYTES))
    delivery = ShareDelivery(round_id, "silo-1", (share,))
    key = StageKey("run-a", 2, 1, Stage.MASKED_INPUT)
    task = msg.Task(
        key=key,
        remaining_ms=1500,
        poll_after_ms=100,
        message="upload your masked vector",
        state_sha256="",
        aggregation=msg.AggregationMode.SECURE,
        selected=("silo-1", "silo-2"),
        threshold=2,
        stage_input=delivery,
    )
    message = serde.task_to_proto(task)
    assert stage_key(message.ref) == key and message.aggregation == pb.AGGREGATION_MODE_SECURE
    assert (message.remaining_ms, message.poll_after_ms, message.threshold) == (1500, 100, 2)
    assert list(message.selected) == ["silo-1", "silo-2"] and message.round_config_json == ""
    assert sw.delivery_from_proto(round_id, "silo-1", message.shares) == delivery
    survivors = UnmaskRequest(round_id, ("silo-1",), ("silo-2",))
    unmask = serde.task_to_proto(dataclasses.replace(task, stage_input=survivors))
    assert sw.unmask_request_from_proto(round_id, unmask.survivors, delivery) == survivors
    settings = RoundSettings(train_seed=5, lr_scale=0.5)
    train = serde.task_to_proto(dataclasses.replace(task, key=KEY, settings=settings, stage_input=None))
    assert RoundSettings.from_json(train.round_config_json) == settings and train.WhichOneof("stage_input") is None


def test_requests_read_back_as_the_silo_sent_them() -> None:
    ref = stage_ref(KEY)
    assert serde.task_request_from_proto(pb.TaskRequest(ref=ref, wait_ms=2000)) == msg.TaskRequest(KEY, 2000)
    # A silo's first GetTask has no task to name.
    assert serde.task_request_from_proto(pb.TaskRequest()) == msg.TaskRequest(None, 0)
    download = pb.DownloadRequest(ref=ref, state_sha256="ab" * 32, first_chunk=3)
    assert serde.download_request_from_proto(download) == msg.DownloadRequest(KEY, "ab" * 32, 3)
    report = pb.MetricsReport(ref=ref, metrics_json='{"splits": {}}')
    assert serde.metrics_report_from_proto(report) == msg.MetricsReport(KEY, '{"splits": {}}')
    beat = pb.HeartbeatRequest(ref=ref, status="epoch 3", progress=0.5, leaving="")
    assert serde.heartbeat_request_from_proto(beat) == msg.HeartbeatRequest("epoch 3", 0.5, "")


def test_secure_requests_keep_their_fields_unchecked_and_a_retry_repeats_its_digest() -> None:
    ref = stage_ref(StageKey("run-a", 2, 1, Stage.ADVERTISE_KEYS))
    # Fields of the wrong size are the coordinator's to refuse once it knows the call is for its stage.
    advert = pb.AdvertiseKeysRequest(ref=ref, encryption_public_key=b"c", mask_public_key=b"s", signature=b"x")
    read = serde.advertise_keys_request_from_proto(advert)
    assert read.key == stage_key(ref) and read.keys == msg.SignedKeys(b"c", b"s", b"x", b"")
    resent = pb.AdvertiseKeysRequest.FromString(advert.SerializeToString())
    assert serde.advertise_keys_request_from_proto(resent) == read
    other = serde.advertise_keys_request_from_proto(pb.AdvertiseKeysRequest(ref=ref, encryption_public_key=b"d"))
    assert other.digest != read.digest
    shares = pb.ShareKeysRequest(ref=ref, shares=[pb.OutgoingShare(recipient="silo-2", ciphertext=b"abc")])
    assert serde.share_keys_request_from_proto(shares).shares == (msg.OutgoingShare("silo-2", b"abc"),)
    revealed = pb.UnmaskRequest(ref=ref, shares=[pb.RevealedShare(owner="silo-2", kind=pb.SHARE_KIND_MASK_KEY)])
    (share,) = serde.reveal_shares_request_from_proto(revealed).shares
    assert share == msg.RevealedShareBytes("silo-2", msg.ShareKind.MASK_KEY, b"") and type(share.kind) is msg.ShareKind


def test_an_upload_reads_back_header_first_and_the_state_download_reassembles() -> None:
    encoded = encode_plain_update(PARAMS, {"all": 8.0}, ("all",))
    header = pb.UpdateHeader(
        ref=stage_ref(KEY),
        encoding=pb.UPDATE_ENCODING_PLAIN,
        base_state_sha256="cd" * 32,
        num_examples=8,
        claims_json='{"epsilon": 1.5}',
    )
    received = receive_upload(
        serde.upload_from_proto(update_parts(header, encoded, 64)), max_chunk_bytes=64, max_payload_bytes=10**6
    )
    assert received.payload == encoded.payload
    assert received.header == msg.UpdateHeader(
        key=KEY,
        encoding=msg.UpdateEncoding.PLAIN,
        manifest=encoded.manifest,
        base_state_sha256="cd" * 32,
        num_examples=8,
        claims_json='{"epsilon": 1.5}',
    )
    download = StateDownload(encoded.manifest.payload_sha256, max_payload_bytes=10**6, max_chunk_bytes=64)
    for part in (encoded.manifest, *wire.chunk(encoded, 64)):
        download.feed(state_part(part))
    assert download.result() == encoded


def test_receipts_and_heartbeat_replies_name_the_task() -> None:
    ref = stage_ref(KEY)
    assert serde.receipt_to_proto(msg.Receipt(KEY, True)) == pb.Receipt(ref=ref, duplicate=True)
    upload = serde.upload_receipt_to_proto(msg.UploadReceipt(KEY, "ef" * 32, False))
    assert upload == pb.UploadReceipt(ref=ref, payload_sha256="ef" * 32, duplicate=False)
    assert serde.heartbeat_reply_to_proto(msg.HeartbeatReply("silo-1", KEY)) == pb.HeartbeatReply(
        silo_id="silo-1", current=ref
    )
    assert not serde.heartbeat_reply_to_proto(msg.HeartbeatReply("silo-1")).HasField("current")


def test_fields_the_protocol_cannot_mean_are_refused_naming_the_field() -> None:
    unknown = pb.StageRef(run_id="run-a", stage=42)
    refusals = {
        "TaskRequest.ref.stage: unknown stage 42": lambda: serde.task_request_from_proto(pb.TaskRequest(ref=unknown)),
        "DownloadRequest.ref.stage: unknown stage 42": lambda: serde.download_request_from_proto(
            pb.DownloadRequest(ref=unknown)
        ),
        "MetricsReport.ref.stage: unknown stage 42": lambda: serde.metrics_report_from_proto(
            pb.MetricsReport(ref=unknown)
        ),
        "AdvertiseKeysRequest.ref.stage: unknown stage 42": lambda: serde.advertise_keys_request_from_proto(
            pb.AdvertiseKeysRequest(ref=unknown)
        ),
        "UpdateHeader.ref.stage: unknown stage 42": lambda: serde.update_header_from_proto(
            pb.UpdateHeader(ref=unknown)
        ),
        "UpdateHeader.encoding: unknown update encoding 7": lambda: serde.update_header_from_proto(
            pb.UpdateHeader(ref=stage_ref(KEY), encoding=7)
        ),
        "upload: manifest: not valid JSON": lambda: serde.update_header_from_proto(
            pb.UpdateHeader(ref=stage_ref(KEY), encoding=pb.UPDATE_ENCODING_PLAIN, manifest_json="{")
        ),
    }
    for refusal, convert in refusals.items():
        with pytest.raises(TransferError, match=f"^{refusal}"):
            convert()
    over = pb.ShareKeysRequest(ref=stage_ref(KEY), shares=[pb.OutgoingShare()] * (MAX_SHARES + 1))
    with pytest.raises(MessageError, match=f"^ShareKeysRequest.shares: at most {MAX_SHARES} entries allowed"):
        serde.share_keys_request_from_proto(over)
    odd_kind = pb.UnmaskRequest(ref=stage_ref(KEY), shares=[pb.RevealedShare(owner="silo-2", kind=9)])
    with pytest.raises(MessageError, match=r"^revealed share of 'silo-2': kind 9 is neither seed nor key$"):
        serde.reveal_shares_request_from_proto(odd_kind)


def test_an_upload_without_its_header_or_with_an_empty_message_is_refused() -> None:
    encoded = encode_plain_update(PARAMS, {"all": 8.0}, ("all",))
    parts = list(update_parts(pb.UpdateHeader(ref=stage_ref(KEY), encoding=pb.UPDATE_ENCODING_PLAIN), encoded, 64))
    for stream, refusal in (
        (parts[1:], "upload: the first message must be the header"),
        ([], "upload: the first message must be the header"),
        ([parts[0], pb.UpdatePart(), *parts[1:]], "upload: a message with neither header nor chunk"),
    ):
        with pytest.raises(TransferError, match=f"^{refusal}$"):
            receive_upload(serde.upload_from_proto(iter(stream)), max_chunk_bytes=64, max_payload_bytes=10**6)


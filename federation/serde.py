"""The coordinator's calls between protobuf and the domain types of :mod:`federation.messages`.

As Flower's serde does: :mod:`coordinator.servicer` turns each request into a domain type here and
each reply back, and nothing else in the coordinator sees a protobuf message. A field the protocol
cannot mean (an unknown stage, update encoding or share kind; a list longer than any round can
have; an upload without its header) is refused here, naming the field. What takes the run's state
to judge (is this the silo's stage, do the secure fields have their sizes, does the layout fit)
is judged by the coordinator, so a misdirected call is still refused as such.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from federation import secagg_wire as sw
from federation import wire
from federation.messages import (
    AdvertiseKeysRequest,
    DownloadRequest,
    HeartbeatReply,
    HeartbeatRequest,
    JoinReply,
    JoinRequest,
    MetricsReport,
    Receipt,
    RevealSharesRequest,
    ShareKeysRequest,
    Task,
    TaskRequest,
    UpdateEncoding,
    UpdateHeader,
    UploadPart,
    UploadReceipt,
)
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg.messages import KeyRoster, UnmaskRequest
from federation.transfer import (
    LayoutLimits,
    TransferError,
    chunk_from_proto,
    info_from_summary,
    stage_key,
    stage_ref,
)

# ---- Requests --------------------------------------------------------------------------------------


def join_request_from_proto(request: pb.JoinRequest, limits: LayoutLimits) -> JoinRequest:
    """A Join request, its data summary read against the federation's ``limits`` (a summary past
    them is not read further). A summary that cannot be used is not refused here: the reply says
    why, after the version check."""
    try:
        layout, refusal = info_from_summary(request.data, limits), ""
    except TransferError as exc:
        layout, refusal = None, str(exc)
    return JoinRequest(
        protocol_version=request.protocol_version,
        software_version=request.software_version,
        capabilities=tuple(request.capabilities),
        layout=layout,
        layout_refusal=refusal,
    )


def task_request_from_proto(request: pb.TaskRequest) -> TaskRequest:
    """A GetTask request; no ``ref`` (a silo's first call) is no last task."""
    last = stage_key(request.ref, "TaskRequest.ref.stage") if request.HasField("ref") else None
    return TaskRequest(last=last, wait_ms=request.wait_ms)


def download_request_from_proto(request: pb.DownloadRequest) -> DownloadRequest:
    """A DownloadState request."""
    return DownloadRequest(
        key=stage_key(request.ref, "DownloadRequest.ref.stage"),
        state_sha256=request.state_sha256,
        first_chunk=request.first_chunk,
    )


def heartbeat_request_from_proto(request: pb.HeartbeatRequest) -> HeartbeatRequest:
    """A Heartbeat request; its ``ref`` is the silo's own account of its task, which the reply
    corrects, so it is not read."""
    return HeartbeatRequest(status=request.status, progress=request.progress, leaving=request.leaving)


def update_header_from_proto(header: pb.UpdateHeader) -> UpdateHeader:
    """An upload's header, its manifest parsed and bounded (:meth:`~federation.wire.Manifest.from_json`)."""
    key = stage_key(header.ref, "UpdateHeader.ref.stage")
    try:
        encoding = UpdateEncoding(header.encoding)
    except ValueError:
        raise TransferError(f"UpdateHeader.encoding: unknown update encoding {header.encoding}") from None
    try:
        manifest = wire.Manifest.from_json(header.manifest_json)
    except wire.WireError as exc:
        raise TransferError(f"upload: {exc}") from exc
    return UpdateHeader(
        key=key,
        encoding=encoding,
        manifest=manifest,
        base_state_sha256=header.base_state_sha256,
        num_examples=header.num_examples,
        claims_json=header.claims_json,
    )


def upload_from_proto(parts: Iterator[pb.UpdatePart]) -> Iterator[UploadPart]:
    """An UploadUpdate stream as its header, then its chunks, each message read from the wire only
    when the next part is asked for: the coordinator admits the header before any chunk is read.
    Which part comes where is :func:`~federation.transfer.receive_upload`'s to check."""
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "header":
            yield update_header_from_proto(part.header)
        elif kind == "chunk":
            yield chunk_from_proto(part.chunk)
        else:
            raise TransferError("upload: a message with neither header nor chunk")


def metrics_report_from_proto(request: pb.MetricsReport) -> MetricsReport:
    """A ReportMetrics request. ``secure_sum`` is not read: secure metrics travel as a masked upload."""
    return MetricsReport(key=stage_key(request.ref, "MetricsReport.ref.stage"), metrics_json=request.metrics_json)


def _digest(request: pb.AdvertiseKeysRequest | pb.ShareKeysRequest | pb.UnmaskRequest) -> str:
    """The SHA-256 of a request as sent: a retried call resends the same request, so its
    deterministic serialization repeats."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def advertise_keys_request_from_proto(request: pb.AdvertiseKeysRequest) -> AdvertiseKeysRequest:
    """An AdvertiseKeys request, its keys as sent."""
    return AdvertiseKeysRequest(
        key=stage_key(request.ref, "AdvertiseKeysRequest.ref.stage"),
        keys=sw.signed_keys_from_proto(request),
        digest=_digest(request),
    )


def share_keys_request_from_proto(request: pb.ShareKeysRequest) -> ShareKeysRequest:
    """A ShareKeys request, its shares as sent (at most as many as any round can have)."""
    return ShareKeysRequest(
        key=stage_key(request.ref, "ShareKeysRequest.ref.stage"),
        shares=sw.outgoing_shares_from_proto(request.shares, "ShareKeysRequest.shares"),
        digest=_digest(request),
    )


def reveal_shares_request_from_proto(request: pb.UnmaskRequest) -> RevealSharesRequest:
    """An Unmask request, its shares as sent (bounded in number, each of a known kind)."""
    return RevealSharesRequest(
        key=stage_key(request.ref, "UnmaskRequest.ref.stage"),
        shares=sw.revealed_shares_from_proto(request.shares, "UnmaskRequest.shares"),
        digest=_digest(request),
    )


# ---- Replies ----------------------------------------------------------------------------------------


def join_reply_to_proto(reply: JoinReply) -> pb.JoinReply:
    """A JoinReply message."""
    return pb.JoinReply(
        accepted=reply.accepted,
        reason=reply.reason,
        silo_id=reply.silo_id,
        federation_name=reply.federation_name,
        run_id=reply.run_id,
        protocol_version=reply.protocol_version,
        software_version=reply.software_version,
        capabilities=list(reply.capabilities),
        model_config_json="" if reply.settings is None else reply.settings.to_json(),
        poll_interval_ms=reply.poll_interval_ms,
        max_chunk_bytes=reply.max_chunk_bytes,
        rounds=reply.rounds,
        silos_per_round=reply.silos_per_round,
        allowed_silos=reply.allowed_silos,
    )


def task_to_proto(task: Task) -> pb.Task:
    """A Task message, with its stage input in the field of its kind."""
    message = pb.Task(
        ref=stage_ref(task.key),
        remaining_ms=task.remaining_ms,
        poll_after_ms=task.poll_after_ms,
        message=task.message,
        state_sha256=task.state_sha256,
        round_config_json="" if task.settings is None else task.settings.to_json(),
        aggregation=int(task.aggregation),
        threshold=task.threshold,
        selected=list(task.selected),
    )
    given = task.stage_input
    if isinstance(given, KeyRoster):
        message.key_roster.CopyFrom(sw.roster_to_proto(given))
    elif isinstance(given, UnmaskRequest):
        message.survivors.CopyFrom(sw.unmask_request_to_proto(given))
    elif given is not None:
        message.shares.CopyFrom(sw.delivery_to_proto(given))
    return message


def heartbeat_reply_to_proto(reply: HeartbeatReply) -> pb.HeartbeatReply:
    """A HeartbeatReply message; no current task leaves ``current`` unset."""
    message = pb.HeartbeatReply(silo_id=reply.silo_id)
    if reply.current is not None:
        message.current.CopyFrom(stage_ref(reply.current))
    return message


def upload_receipt_to_proto(receipt: UploadReceipt) -> pb.UploadReceipt:
    """An UploadReceipt message."""
    return pb.UploadReceipt(
        ref=stage_ref(receipt.key), payload_sha256=receipt.payload_sha256, duplicate=receipt.duplicate
    )


def receipt_to_proto(receipt: Receipt) -> pb.Receipt:
    """A Receipt message."""
    return pb.Receipt(ref=stage_ref(receipt.key), duplicate=receipt.duplicate)

"""Between the protobuf messages of the wire contract and the tensor wire format, for both sides.

The coordinator and the silo agent move the same things: a stage reference, a data summary, a
global state streamed down as a manifest and checksummed chunks, and an update streamed up as a
header and chunks. This module is the one place where those messages are built and read, so the
two sides cannot drift apart. It knows no sockets: it turns objects into message iterators and
message iterators back into checked objects. The coordinator reassembles an upload from its domain
parts (:func:`receive_upload`), which :mod:`federation.serde` reads off the wire one message at a
time.

A plain update is the silo's trained parameters (float32, named as in the model) plus one float64
tensor ``group_weights`` holding the silo's FedAvg weight of every aggregation group, in the
order of the group names. A masked update (secure aggregation) replaces that payload with one
uint64 vector under the same header and chunk messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from condi_models.data.dataset import DatasetInfo, Modality
from federation import wire
from federation.messages import UpdateHeader, UploadPart
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.stages import Stage, StageKey

# Version of the wire contract in proto/condi/v1 that both sides speak.
PROTOCOL_VERSION = 1
GROUP_WEIGHTS = "group_weights"


class TransferError(ValueError):
    """A message, or a sequence of them, that does not form a usable request, state or update; the
    message says which part."""


class NonFiniteUpdateError(TransferError):
    """An update holding NaN or infinite values; a silo refuses to send it."""


def stage_key(ref: pb.StageRef, where: str = "stage reference") -> StageKey:
    """The key a StageRef message carries; a stage number the protocol does not have is refused,
    the refusal naming the field as ``where``."""
    try:
        stage = Stage(int(ref.stage))
    except ValueError:
        raise TransferError(f"{where}: unknown stage {int(ref.stage)}") from None
    return StageKey(run_id=ref.run_id, round=int(ref.round), attempt=int(ref.attempt), stage=stage)


def stage_ref(key: StageKey) -> pb.StageRef:
    """The StageRef message of ``key``."""
    return pb.StageRef(run_id=key.run_id, round=key.round, attempt=key.attempt, stage=int(key.stage))


# ---------------------------------------------------------------------------------------------
# Chunks


def chunk_to_proto(piece: wire.Chunk) -> pb.Chunk:
    """A wire chunk as a Chunk message."""
    return pb.Chunk(
        index=piece.index,
        total=piece.total,
        data=piece.data,
        sha256=piece.sha256,
        payload_sha256=piece.payload_sha256,
    )


def chunk_from_proto(message: pb.Chunk) -> wire.Chunk:
    """A Chunk message as a wire chunk (checked when it reaches a Reassembler)."""
    return wire.Chunk(
        index=int(message.index),
        total=int(message.total),
        data=bytes(message.data),
        sha256=message.sha256,
        payload_sha256=message.payload_sha256,
    )


def _check_chunk_size(piece: wire.Chunk, max_chunk_bytes: int) -> None:
    if len(piece.data) > max_chunk_bytes:
        raise TransferError(
            f"chunk {piece.index} of {piece.total}: {len(piece.data)} bytes, "
            f"over the limit of {max_chunk_bytes}"
        )


# ---------------------------------------------------------------------------------------------
# Global state, downwards


def state_part(part: wire.Manifest | wire.Chunk) -> pb.StatePart:
    """One message of a state download: the manifest, or a chunk."""
    if isinstance(part, wire.Manifest):
        return pb.StatePart(manifest_json=part.to_json())
    return pb.StatePart(chunk=chunk_to_proto(part))


def state_parts(
    encoded: wire.EncodedState, max_chunk_bytes: int, first_chunk: int = 0
) -> Iterator[pb.StatePart]:
    """The messages of a state download: the manifest, then the chunks from ``first_chunk`` on."""
    yield state_part(encoded.manifest)
    for piece in wire.chunk(encoded, max_chunk_bytes)[first_chunk:]:
        yield state_part(piece)


class StateDownload:
    """Collects a state download, possibly over several streams after a broken one.

    Every stream starts with the manifest, which must describe the payload asked for; chunks
    are checked one by one. :attr:`next_chunk` is where a resumed stream should start.
    """

    def __init__(self, expected_sha256: str, *, max_payload_bytes: int, max_chunk_bytes: int) -> None:
        self.expected_sha256 = expected_sha256
        self.max_payload_bytes = max_payload_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.manifest: wire.Manifest | None = None
        self._assembler: wire.Reassembler | None = None
        self._expect_manifest = True
        self.bytes_received = 0

    def start_stream(self) -> None:
        """Call before reading a new stream: its first message must be the manifest again."""
        self._expect_manifest = True

    @property
    def next_chunk(self) -> int:
        """Index of the first chunk not yet received (chunks arrive in order)."""
        return 0 if self._assembler is None else self._assembler.received

    @property
    def complete(self) -> bool:
        """True once every chunk has arrived."""
        return self._assembler is not None and self._assembler.complete

    def feed(self, part: pb.StatePart) -> None:
        """Take the next message of the current stream."""
        kind = part.WhichOneof("part")
        if self._expect_manifest:
            if kind != "manifest_json":
                raise TransferError("state download: the first message of a stream must be the manifest")
            try:
                manifest = wire.Manifest.from_json(part.manifest_json)
            except wire.WireError as exc:
                raise TransferError(f"state download: {exc}") from exc
            if manifest.payload_sha256 != self.expected_sha256:
                raise TransferError(
                    f"state download: the coordinator sent state {manifest.payload_sha256[:12]}, "
                    f"expected {self.expected_sha256[:12]}"
                )
            if manifest.payload_bytes > self.max_payload_bytes:
                raise TransferError(
                    f"state download: {manifest.payload_bytes} bytes, "
                    f"over the limit of {self.max_payload_bytes}"
                )
            if self.manifest is None:
                self.manifest = manifest
                self._assembler = wire.Reassembler(
                    max_payload_bytes=manifest.payload_bytes,
                    payload_sha256=manifest.payload_sha256,
                    min_chunk_bytes=min(wire.MIN_CHUNK_BYTES, self.max_chunk_bytes),
                )
            self._expect_manifest = False
            return
        if kind != "chunk":
            raise TransferError("state download: a second manifest inside one stream")
        piece = chunk_from_proto(part.chunk)
        _check_chunk_size(piece, self.max_chunk_bytes)
        assert self._assembler is not None
        try:
            self._assembler.add(piece)
        except wire.WireError as exc:
            raise TransferError(f"state download: {exc}") from exc
        self.bytes_received += len(piece.data)

    def result(self) -> wire.EncodedState:
        """The complete, checksum-verified state."""
        if self.manifest is None or self._assembler is None:
            raise TransferError("state download: no manifest received")
        try:
            payload = self._assembler.payload()
        except wire.WireError as exc:
            raise TransferError(f"state download: {exc}") from exc
        return wire.EncodedState(manifest=self.manifest, payload=payload)


def receive_state(
    parts: Iterable[pb.StatePart], expected_sha256: str, *, max_payload_bytes: int, max_chunk_bytes: int
) -> wire.EncodedState:
    """One complete state download from a single stream."""
    download = StateDownload(
        expected_sha256, max_payload_bytes=max_payload_bytes, max_chunk_bytes=max_chunk_bytes
    )
    for part in parts:
        download.feed(part)
    return download.result()


# ---------------------------------------------------------------------------------------------
# Updates, upwards


def update_parts(
    header: pb.UpdateHeader, encoded: wire.EncodedState, max_chunk_bytes: int
) -> Iterator[pb.UpdatePart]:
    """The messages of an upload: ``header`` with the manifest filled in, then the chunks."""
    full = pb.UpdateHeader()
    full.CopyFrom(header)
    full.manifest_json = encoded.manifest.to_json()
    yield pb.UpdatePart(header=full)
    for piece in wire.chunk(encoded, max_chunk_bytes):
        yield pb.UpdatePart(chunk=chunk_to_proto(piece))


@dataclass(frozen=True)
class ReceivedUpload:
    """An upload as reassembled and checksum-verified, not yet interpreted."""

    header: UpdateHeader
    payload: bytes


def receive_upload(
    parts: Iterator[UploadPart],
    *,
    max_chunk_bytes: int,
    max_payload_bytes: int,
    check_header: Callable[[UpdateHeader], None] | None = None,
) -> ReceivedUpload:
    """Reassemble an upload from its header and chunks; ``check_header`` may refuse it before any
    chunk is asked for of ``parts``."""
    header = next(parts, None)
    if not isinstance(header, UpdateHeader):
        raise TransferError("upload: the first message must be the header")
    manifest = header.manifest
    if manifest.payload_bytes > max_payload_bytes:
        raise TransferError(f"upload: {manifest.payload_bytes} bytes, over the limit of {max_payload_bytes}")
    if check_header is not None:
        check_header(header)
    assembler = wire.Reassembler(
        max_payload_bytes=manifest.payload_bytes,
        payload_sha256=manifest.payload_sha256,
        min_chunk_bytes=min(wire.MIN_CHUNK_BYTES, max_chunk_bytes),
    )
    for piece in parts:
        if not isinstance(piece, wire.Chunk):
            raise TransferError("upload: a second header inside one stream")
        _check_chunk_size(piece, max_chunk_bytes)
        try:
            assembler.add(piece)
        except wire.WireError as exc:
            raise TransferError(f"upload: {exc}") from exc
    try:
        payload = assembler.payload()
    except wire.WireError as exc:
        raise TransferError(f"upload: {exc}") from exc
    return ReceivedUpload(header=header, payload=payload)


def encode_plain_update(
    params: Mapping[str, np.ndarray], weights: Mapping[str, float], group_names: Sequence[str]
) -> wire.EncodedState:
    """A silo's plain update; raises :class:`NonFiniteUpdateError` rather than encode NaN or infinity."""
    if GROUP_WEIGHTS in params:
        raise TransferError(f"update: a parameter may not be called {GROUP_WEIGHTS!r}")
    unknown = sorted(set(weights) - set(group_names))
    if unknown:
        raise TransferError(f"update: weights for unknown groups {unknown}")
    vector = np.array([float(weights.get(g, 0.0)) for g in group_names], dtype=np.float64)
    bad = [name for name, value in params.items() if not np.all(np.isfinite(value))]
    if not np.all(np.isfinite(vector)):
        bad.append(GROUP_WEIGHTS)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteUpdateError(f"update holds NaN or infinite values in {len(bad)} tensors ({shown})")
    named = {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}
    named[GROUP_WEIGHTS] = vector
    return wire.encode_state(named)


def plain_update_payload_bytes(param_shapes: Mapping[str, tuple[int, ...]], n_groups: int) -> int:
    """The exact payload size of a plain update for these parameters."""
    return sum(4 * math.prod(s) for s in param_shapes.values()) + 8 * n_groups


def decode_plain_update(
    manifest: wire.Manifest,
    payload: bytes,
    param_shapes: Mapping[str, tuple[int, ...]],
    group_names: Sequence[str],
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Parameters and group weights of a plain update, every name, dtype, shape and value checked.

    Refused: missing or extra tensors, wrong dtype or shape, NaN or infinity anywhere, negative
    weights, and a modality weight above the sample weight (no modality is observed in more
    samples than the silo has).
    """
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        n: ("float32", tuple(s)) for n, s in param_shapes.items()
    }
    expected[GROUP_WEIGHTS] = ("float64", (len(group_names),))
    try:
        tensors = wire.decode_state(manifest, payload, expected, finite=True)
    except wire.WireError as exc:
        raise TransferError(f"update: {exc}") from exc
    vector = tensors.pop(GROUP_WEIGHTS)
    weights = {g: float(w) for g, w in zip(group_names, vector, strict=True)}
    negative = [g for g, w in weights.items() if w < 0]
    if negative:
        raise TransferError(f"update: negative group weights for {negative}")
    total = weights.get("all")
    if total is not None:
        above = [g for g, w in weights.items() if w > total]
        if above:
            raise TransferError(f"update: group weights {above} exceed the sample weight {total:g}")
    return tensors, weights


# ---------------------------------------------------------------------------------------------
# Data layout


def data_summary(info: DatasetInfo) -> pb.DataSummary:
    """What a silo tells the coordinator about its data at Join: the layout alone, no count and no
    record (counts go through the statistics stage, federation.statistics)."""
    return pb.DataSummary(
        dataset=info.name,
        sampling_rate_hz=info.sampling_rate_hz,
        length=info.length,
        modalities=[
            pb.ModalitySummary(name=m.name, channels=len(m.channels), channel_names=list(m.channels))
            for m in info.modalities
        ],
        classes=list(info.classes),
        task=info.task,
    )


@dataclass(frozen=True)
class LayoutLimits:
    """The largest data layout a federation takes from a silo's summary (federation.yaml
    ``layout_limits``): the model grows with modalities, channels and classes, and unless
    federation.yaml pins ``layout:`` the first silo to join fixes it, so each is bounded before any
    model is built."""

    max_modalities: int = 64
    max_channels: int = 512
    max_length: int = 100_000
    max_classes: int = 256
    max_name_chars: int = 128

    def problem(
        self, *, modalities: int, channels: int, classes: int, length: int, names: Iterable[str]
    ) -> str | None:
        """Why a layout of these sizes and names is past the limits, or None when it is within them."""
        counts = {
            "modalities": (modalities, self.max_modalities),
            "channels": (channels, self.max_channels),
            "classes": (classes, self.max_classes),
            "length": (length, self.max_length),
        }
        for what, (value, most) in counts.items():
            if value > most:
                return f"{value} {what}, this federation takes at most {most}"
        longest = max((len(n) for n in names), default=0)
        if longest > self.max_name_chars:
            return f"a name of {longest} characters, at most {self.max_name_chars}"
        return None


def info_from_summary(summary: pb.DataSummary, limits: LayoutLimits | None = None) -> DatasetInfo:
    """The data layout a summary describes; an inconsistent summary, or one past ``limits``, raises
    naming the field."""
    limits = limits or LayoutLimits()
    if not summary.modalities:
        raise TransferError("data summary: no modalities")
    names = [summary.dataset, summary.task, *summary.classes]
    for m in summary.modalities:
        names += [m.name, *m.channel_names]
    problem = limits.problem(
        modalities=len(summary.modalities),
        channels=sum(m.channels for m in summary.modalities),
        classes=len(summary.classes),
        length=summary.length,
        names=names,
    )
    if problem is not None:
        raise TransferError(f"data summary: {problem}")
    modalities = []
    for i, m in enumerate(summary.modalities):
        if not m.name:
            raise TransferError(f"data summary: modality {i} has no name")
        if m.channels < 1 or len(m.channel_names) != m.channels:
            raise TransferError(
                f"data summary: modality {m.name!r} has {m.channels} channels "
                f"but {len(m.channel_names)} channel names"
            )
        modalities.append(Modality(name=m.name, channels=tuple(m.channel_names)))
    if len(summary.classes) < 2:
        raise TransferError(f"data summary: {len(summary.classes)} classes, at least 2 needed")
    if summary.length < 1 or not math.isfinite(summary.sampling_rate_hz) or summary.sampling_rate_hz <= 0:
        raise TransferError("data summary: length and sampling rate must be positive")
    return DatasetInfo(
        name=summary.dataset,
        modalities=tuple(modalities),
        sampling_rate_hz=float(summary.sampling_rate_hz),
        length=int(summary.length),
        classes=tuple(summary.classes),
        task=summary.task,
    )

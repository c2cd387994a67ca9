"""The coordinator's state and driver: the round machine, the global model, checkpoints.

:class:`Coordinator` holds everything the gRPC handlers touch behind one lock: the
:class:`~coordinator.rounds.RoundMachine`, the global state (and its encoded, chunked form for
downloads), the data layout and the checkpoint. Handlers only record and answer; one driver
thread (:meth:`Coordinator.run`) makes every transition, averages updates outside the lock,
commits checkpoints, writes ``status.json`` for the operator and logs progress (round, stage,
silos done). :mod:`coordinator.app` serves it over mutual TLS; :mod:`coordinator.servicer` is its
gRPC face.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from condi_models.aggregation import SiloUpdate
from condi_models.batches import record_window_starts
from condi_models.checkpoint import atomic_write_bytes
from condi_models.data.dataset import DatasetInfo
from condi_models.nn.config import ModelConfig
from condi_models.training import round_lr_scale
from coordinator.config import FederationConfig
from coordinator.global_model import GlobalModel, RunningSums
from coordinator.layout import layout_mismatch
from coordinator.pooling import ReportError, check_split_report
from coordinator.report import SiloUpload, TrainRecord, round_row, train_summary, write_report
from coordinator.rounds import (
    Aggregate,
    Counted,
    Evaluated,
    Failed,
    Finished,
    Persist,
    Phase,
    ProtocolError,
    Retry,
    RoundMachine,
    RoundPlan,
    RoundProgress,
    SecurePlan,
    TaskView,
)
from coordinator.store import CheckpointStore, CoordinatorCheckpoint, StoreError, split_saved_state
from federation import identity, pki, wire
from federation import secagg_wire as sw
from federation.faults import FaultPoint, exit_hard
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg import KeyRoster, MaskedInput, MessageError, QuantConfig, UnmaskRequest, ca_cert_verifier
from federation.secure_metrics import MetricsEncodingError, decode_metrics
from federation.stages import Stage, StageKey, stage_name
from federation.statistics import PooledStatistics, StatisticsError, StatisticsLayout, check_statistics_report
from federation.transfer import (
    PROTOCOL_VERSION,
    TransferError,
    decode_plain_update,
    info_from_summary,
    receive_upload,
    stage_key,
    stage_ref,
)
from federation.untrusted import shown

log = logging.getLogger(__name__)

CAPABILITIES = ("plain-aggregation", "secure-aggregation")
_DRIVER_PERIOD_S = 0.25


def software_version() -> str:
    """The installed condi package version, for the handshake and the logs."""
    try:
        return metadata.version("condi")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_run_id(federation: str) -> str:
    """A fresh run id: the federation name, the UTC start time and a random suffix."""
    return f"{federation}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class Coordinator:
    """The coordinator's state and the operations gRPC handlers call (thread-safe)."""

    def __init__(
        self,
        cfg: FederationConfig,
        *,
        revocations: identity.RevocationList,
        clock: Callable[[], float] = time.monotonic,
        exit_at: FaultPoint | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        # Fault injection (tests, the harness): (round, stage) at whose first accepted submission to die.
        self.exit_at = exit_at
        self.run_dir = Path(cfg.run_dir)
        self.store = CheckpointStore(self.run_dir)
        self.max_chunk_bytes = cfg.max_chunk_bytes
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self.plan = RoundPlan(
            allowed=tuple(cfg.silos),
            rounds=cfg.rounds,
            silos_per_round=cfg.silos_per_round,
            min_silos=cfg.min_silos,
            max_attempts=cfg.max_attempts,
            seed=cfg.seed,
            gather_s=cfg.timeouts.gather_s,
            train_s=cfg.timeouts.train_s,
            evaluate_s=cfg.timeouts.evaluate_s,
            liveness_s=cfg.timeouts.liveness_s,
            secure=self._secure_plan(cfg, revocations),
            final_test=cfg.model_selection == "best_val_auroc",
            lr_scales=tuple(round_lr_scale(cfg.training, r, cfg.rounds) for r in range(cfg.rounds)),
        )
        loaded = self.store.load()
        tensors = None
        optimizer_state: dict[str, np.ndarray] = {}
        if loaded is None:
            self.ckpt = CoordinatorCheckpoint(
                run_id=new_run_id(cfg.name),
                federation=cfg.name,
                progress=RoundProgress.start(cfg.seed, statistics=True),
            )
            log.info("new run %s of federation %s in %s", self.ckpt.run_id, cfg.name, self.run_dir)
        else:
            self.ckpt, saved = loaded
            tensors, optimizer_state = split_saved_state(saved) if saved is not None else (None, {})
            if self.ckpt.federation != cfg.name:
                raise StoreError(
                    f"{self.store.progress_path}: holds a run of federation {self.ckpt.federation!r}, "
                    f"not {cfg.name!r}; use another run_dir"
                )
            p = self.ckpt.progress
            log.info(
                "resuming run %s from its checkpoint: round %d, %s pending, %d rounds recorded",
                self.ckpt.run_id,
                p.round,
                p.pending,
                len(self.ckpt.rows),
            )
        # Built once the layout is known (federation.yaml, the checkpoint or the first silo to join).
        self.model: GlobalModel | None = None
        if self.ckpt.layout is not None:
            self._adopt_layout(self.ckpt.layout, self.ckpt.model, tensors)
            assert self.model is not None
            try:
                self.model.optimizer.load_state(optimizer_state)
            except ValueError as exc:
                raise StoreError(f"{self.store.dir}: {exc}") from exc
        self.machine = RoundMachine(
            self.plan, self.ckpt.run_id, self.ckpt.progress, self.ckpt.state_sha256, clock(), self.ckpt.statistics
        )
        if self.model is not None:
            self._shape_machine()
        self._pin_layout()
        self._downloads: dict[tuple[int, int, int], dict[str, int]] = {}
        # Plain mode: each attempt's accepted contributions, summed as they arrive.
        self._sums = RunningSums()
        self._status_text = ""
        self._progress_line = ""
        self.outcome: tuple[str, str] | None = None

    def _pin_layout(self) -> None:
        """Adopt federation.yaml's ``layout:`` before any silo joins, or check the checkpoint keeps it."""
        if self.cfg.layout is None:
            log.warning("federation.yaml has no layout: the first silo to join fixes the data layout")
            return
        pinned = self.cfg.layout.to_info(self.cfg.name)
        if self.ckpt.layout is None:
            self._fix_layout(pinned, "federation.yaml")
            return
        reason = layout_mismatch(pinned, self.ckpt.layout)
        if reason is not None:
            raise StoreError(
                f"{self.store.progress_path}: the checkpointed run's data layout differs from federation.yaml's "
                f"layout ({reason}); use another run_dir or restore the layout"
            )

    @staticmethod
    def _secure_plan(cfg: FederationConfig, revocations: identity.RevocationList) -> SecurePlan | None:
        if not cfg.secure:
            log.warning("aggregation is plain: the coordinator sees every silo's individual update")
            return None
        if cfg.tls is None:
            raise ValueError("aggregation.mode secure needs tls.ca: peers' key adverts are checked against it")
        agg = cfg.aggregation
        quant = QuantConfig(agg.clip_bound, agg.frac_bits, agg.resolved_ring_bits(cfg.silos_per_round))
        # Adverts are checked against the same reloading CRL as the calls themselves.
        verify = ca_cert_verifier(pki.load_certificate(cfg.tls.ca), revoked=revocations.serials)
        return SecurePlan(
            agg.threshold_for, cfg.timeouts.secure_stage_s, quant, verify, agg.weight_unit, agg.secure_metrics
        )

    # ---- model and state ----------------------------------------------------------------

    def _adopt_layout(
        self, layout: DatasetInfo, model_cfg: ModelConfig | None, tensors: dict[str, np.ndarray] | None
    ) -> None:
        if tensors is None:
            self.model = GlobalModel(self.cfg, layout, model_cfg)
        else:
            try:
                self.model = GlobalModel(self.cfg, layout, model_cfg, tensors)
            except ValueError as exc:
                raise StoreError(f"{self.store.dir}: the checkpointed state does not fit its model ({exc})") from exc
            if self.model.sha256 != self.ckpt.state_sha256:
                raise StoreError(f"{self.store.dir}: the checkpointed state changed when loaded into its model")
        if hasattr(self, "machine"):
            self._shape_machine()

    def _shape_machine(self) -> None:
        """Tell the round machine the sizes submissions must have (caller holds the lock)."""
        assert self.model is not None
        if self.plan.secure is not None:
            self.machine.vector_length = self.model.secure_layout.vector_length
        layout = self.model.settings.layout
        self.machine.data_shape = (len(layout.classes), layout.n_features)

    def _fix_layout(self, info: DatasetInfo, by: str) -> None:
        """Build the initial global model for ``info`` and checkpoint both (caller holds the lock)."""
        self._adopt_layout(info, None, None)
        assert self.model is not None
        name, sha = self.store.save_state(self.machine.round, self.model.state)
        self.ckpt.layout = info
        self.ckpt.model = self.model.settings.model
        self.ckpt.state_file, self.ckpt.state_sha256 = name, sha
        self.machine.state_sha256 = sha
        self._checkpoint()
        log.info(
            "data layout fixed by %s: %d modalities, %d channels, %d steps at %g Hz, classes %s",
            by,
            info.n_modalities,
            info.n_features,
            info.length,
            info.sampling_rate_hz,
            list(info.classes),
        )

    def _checkpoint(self) -> None:
        """Commit the current progress (caller holds the lock)."""
        self.ckpt.progress = self.machine.progress()
        self.store.commit(self.ckpt)

    # ---- handler operations ---------------------------------------------------------------

    def join(self, silo: str, request: pb.JoinRequest) -> pb.JoinReply:
        """Handshake: check version and layout (fixed by the first join unless pinned), send the run settings."""
        reply = pb.JoinReply(
            silo_id=silo,
            federation_name=self.cfg.name,
            run_id=self.ckpt.run_id,
            protocol_version=PROTOCOL_VERSION,
            software_version=software_version(),
            capabilities=list(CAPABILITIES),
            poll_interval_ms=self.cfg.poll_interval_ms,
            max_chunk_bytes=self.max_chunk_bytes,
            rounds=self.plan.rounds,
            silos_per_round=self.plan.silos_per_round,
            allowed_silos=len(self.plan.allowed),
        )

        def refuse(reason: str) -> pb.JoinReply:
            log.warning("refused Join from silo %s: %s", silo, reason)
            reply.accepted = False
            reply.reason = reason
            return reply

        if request.protocol_version != PROTOCOL_VERSION:
            return refuse(
                f"protocol version {request.protocol_version} is not supported; this coordinator speaks "
                f"{PROTOCOL_VERSION}"
            )
        try:
            info = info_from_summary(request.data, self.cfg.layout_limits)
        except TransferError as exc:
            return refuse(str(exc))
        with self._cond:
            if self.ckpt.layout is None:
                self._fix_layout(info, f"silo {silo}")
            else:
                reason = layout_mismatch(self.ckpt.layout, info)
                if reason is not None:
                    return refuse(f"data layout does not match the federation's: {reason}")
            self.machine.join(silo, self.clock())
            self._cond.notify_all()
        assert self.model is not None
        reply.accepted = True
        reply.model_config_json = self.model.settings.to_json()
        log.info(
            "silo %s joined (software %s, capabilities %s)",
            silo,
            shown(request.software_version or "?", 64),
            [shown(c, 64) for c in request.capabilities[:16]],
        )
        return reply

    def _task_message(self, view: TaskView) -> pb.Task:
        task = pb.Task(
            ref=stage_ref(view.key),
            remaining_ms=int(view.remaining_s * 1000),
            poll_after_ms=self.cfg.poll_interval_ms,
            message=view.message,
            state_sha256=view.state_sha256,
            aggregation=pb.AGGREGATION_MODE_PLAIN if self.plan.secure is None else pb.AGGREGATION_MODE_SECURE,
            selected=list(view.selected),
        )
        if view.key.stage in (pb.STAGE_TRAIN, pb.STAGE_ADVERTISE_KEYS, pb.STAGE_EVALUATE):
            task.round_config_json = view.settings.to_json()
        config = self.machine.secure_config
        if config is not None and view.round_id:
            task.threshold = config.threshold
        given = view.stage_input
        if isinstance(given, KeyRoster):
            task.key_roster.CopyFrom(sw.roster_to_proto(given))
        elif isinstance(given, UnmaskRequest):
            task.survivors.CopyFrom(sw.unmask_request_to_proto(given))
        elif given is not None:
            task.shares.CopyFrom(sw.delivery_to_proto(given))
        return task

    def get_task(self, silo: str, request: pb.TaskRequest) -> pb.Task:
        """The silo's task, held while unchanged for up to ``wait_ms`` (at most a third of liveness_s)."""
        asked = stage_key(request.ref) if request.HasField("ref") else None
        hold = min(request.wait_ms / 1000.0, self.cfg.timeouts.liveness_s / 3.0)
        with self._cond:
            now = self.clock()
            self.machine.seen(silo, now)
            view = self.machine.task_for(silo, now)
            end = now + hold
            while view.key == asked and view.key.stage != pb.STAGE_DONE and not self._stopping.is_set():
                if end - now <= 0:
                    break
                self._cond.wait(end - now)
                now = self.clock()
                view = self.machine.task_for(silo, now)
            self.machine.seen(silo, now)
        return self._task_message(view)

    def download(self, silo: str, request: pb.DownloadRequest) -> Iterator[pb.StatePart]:
        """The current global state for the silo's TRAIN or EVALUATE task, from ``first_chunk`` on."""
        key = stage_key(request.ref)
        with self._cond:
            self.machine.seen(silo, self.clock())
            if key.stage not in (pb.STAGE_TRAIN, pb.STAGE_ADVERTISE_KEYS, pb.STAGE_EVALUATE):
                raise ProtocolError(
                    "failed_precondition",
                    f"downloads belong to TRAIN, ADVERTISE_KEYS or EVALUATE, not {stage_name(key.stage)}",
                )
            self.machine.check(silo, key, key.stage)
            if request.state_sha256 != self.machine.state_sha256:
                raise ProtocolError(
                    "not_found",
                    f"state {request.state_sha256[:12] or '(none)'} is not the current one "
                    f"({self.machine.state_sha256[:12]})",
                )
            assert self.model is not None
            manifest, pieces = self.model.manifest_part, self.model.pieces
            counter = self._downloads.setdefault((key.round, key.attempt, key.stage), {})
        if request.first_chunk > len(pieces):
            raise ProtocolError(
                "invalid_argument", f"first_chunk {request.first_chunk} beyond {len(pieces)} chunks"
            )

        def stream() -> Iterator[pb.StatePart]:
            yield manifest
            for part in pieces[request.first_chunk :]:
                with self._cond:
                    counter[silo] = counter.get(silo, 0) + len(part.chunk.data)
                yield part

        return stream()

    def upload(self, silo: str, parts: Iterator[pb.UpdatePart]) -> pb.UploadReceipt:
        """Receive, check and record a plain update of the silo's current TRAIN task, or in secure mode
        its masked vector of the MASKED_INPUT task."""
        model = self.model
        if model is None:
            raise ProtocolError("failed_precondition", "no model yet: no silo has joined")
        if self.plan.secure is not None:
            return self._upload_masked(silo, parts)
        started = self.clock()
        # The state the update was trained from, read with the base-state check under the lock.
        base: dict[str, dict[str, np.ndarray]] = {}

        def check_header(header: pb.UpdateHeader, manifest: wire.Manifest) -> None:
            if header.encoding != pb.UPDATE_ENCODING_PLAIN:
                raise ProtocolError(
                    "invalid_argument",
                    f"update encoding {pb.UpdateEncoding.Name(header.encoding)}: "
                    "this run aggregates plain updates",
                )
            key = stage_key(header.ref)
            with self._cond:
                self.machine.seen(silo, self.clock())
                if self.machine.admit(
                    silo, key, Stage.TRAIN, manifest.payload_sha256, base_state_sha256=header.base_state_sha256
                ):
                    return
                base["state"] = model.state
            if manifest.payload_bytes != model.update_bytes:
                raise ProtocolError(
                    "invalid_argument",
                    f"update of {manifest.payload_bytes} bytes; "
                    f"a plain update of this model has {model.update_bytes}",
                )

        received = receive_upload(
            parts,
            max_chunk_bytes=self.max_chunk_bytes,
            max_payload_bytes=model.update_bytes,
            check_header=check_header,
        )
        upload_s = self.clock() - started
        params, weights = decode_plain_update(
            received.manifest, received.payload, model.param_shapes, model.group_names
        )
        header = received.header
        if header.num_examples != round(weights.get("all", 0.0)):
            raise ProtocolError(
                "invalid_argument",
                f"num_examples {header.num_examples} differs from the update's sample weight "
                f"{weights.get('all', 0.0):g}",
            )
        key = stage_key(header.ref)
        # Capped and clipped as a secure contribution is, so one silo's claims move the model no
        # further in plain mode than in secure mode; from here on only the sum holds its tensors.
        contribution = model.secure_layout.contribution(
            base.get("state", model.state), SiloUpdate(params=params, weights=weights)
        )
        record = SiloUpload(
            weights=weights,
            claims=_claims(header.claims_json),
            upload_s=upload_s,
            upload_bytes=received.manifest.payload_bytes,
            clipped=contribution.clipped,
        )
        with self._cond:
            duplicate = self.machine.accept_update(
                silo, key, header.base_state_sha256, received.manifest.payload_sha256, record
            )
            if not duplicate:
                self._sums.add(key.round, key.attempt, silo, contribution.vector)
            self._fault_point(silo, key, duplicate)
            self._cond.notify_all()
        log.info(
            "%s update from silo %s for %s: %d samples, %d bytes in %.2f s",
            "duplicate" if duplicate else "accepted",
            silo,
            key.describe(),
            header.num_examples,
            received.manifest.payload_bytes,
            upload_s,
        )
        return pb.UploadReceipt(
            ref=header.ref, payload_sha256=received.manifest.payload_sha256, duplicate=duplicate
        )

    def _upload_masked(self, silo: str, parts: Iterator[pb.UpdatePart]) -> pb.UploadReceipt:
        started = self.clock()
        with self._cond:
            running = self.machine.secure_config
        # The running attempt fixes the shape: a model update, or the metrics of a secure evaluation.
        # Between attempts only a retried update can arrive, to be answered as a duplicate.
        if running is not None:
            length, ring_bits = running.vector_length, running.quant.ring_bits
        else:
            assert self.model is not None and self.plan.secure is not None
            length, ring_bits = self.model.secure_layout.vector_length, self.plan.secure.quant.ring_bits
        dtype = f"uint{ring_bits}"
        expected = length * ring_bits // 8

        def check_header(header: pb.UpdateHeader, manifest: wire.Manifest) -> None:
            if header.encoding != pb.UPDATE_ENCODING_MASKED:
                raise ProtocolError(
                    "invalid_argument",
                    f"update encoding {pb.UpdateEncoding.Name(header.encoding)}: this run aggregates securely; "
                    "the coordinator takes masked vectors only",
                )
            key = stage_key(header.ref)
            with self._cond:
                self.machine.seen(silo, self.clock())
                if self.machine.admit(silo, key, Stage.MASKED_INPUT, manifest.payload_sha256):
                    return
            specs = manifest.tensors
            if len(specs) != 1 or specs[0].dtype != dtype or tuple(specs[0].shape) != (length,):
                raise ProtocolError("invalid_argument", f"a masked vector is one {dtype} tensor of shape ({length},)")

        received = receive_upload(
            parts, max_chunk_bytes=self.max_chunk_bytes, max_payload_bytes=expected, check_header=check_header
        )
        header = received.header
        key = stage_key(header.ref)
        claims = SiloUpload(
            weights={"all": float(_claims(header.claims_json).get("samples", 0.0))},
            claims=_claims(header.claims_json),
            upload_s=self.clock() - started,
            upload_bytes=received.manifest.payload_bytes,
        )
        with self._cond:
            config = self.machine.secure_config
            if config is None:
                raise ProtocolError("failed_precondition", f"no secure round is running for {key.describe()}")
            try:
                masked = MaskedInput(config.round_id, silo, ring_bits, bytes(received.payload))
            except MessageError as exc:
                raise ProtocolError("invalid_argument", f"masked vector: {exc}") from exc
            duplicate = self.machine.accept_secure(silo, key, received.manifest.payload_sha256, masked, claims)
            self._fault_point(silo, key, duplicate)
            self._cond.notify_all()
        log.info(
            "%s masked vector from silo %s for %s: %d bytes",
            "duplicate" if duplicate else "accepted",
            silo,
            key.describe(),
            received.manifest.payload_bytes,
        )
        return pb.UploadReceipt(
            ref=header.ref, payload_sha256=received.manifest.payload_sha256, duplicate=duplicate
        )

    def _secure_call(
        self,
        silo: str,
        request: pb.AdvertiseKeysRequest | pb.ShareKeysRequest | pb.UnmaskRequest,
        stage: int,
        build: Callable[[str], Any],
    ) -> pb.Receipt:
        """One of AdvertiseKeys, ShareKeys, Unmask: rebuild the protocol message and give it to the machine."""
        ref = request.ref
        if self.plan.secure is None:
            raise ProtocolError(
                "unimplemented",
                "this run aggregates in the clear (AGGREGATION_MODE_PLAIN); secure-aggregation calls are not served",
            )
        key = stage_key(ref)
        with self._cond:
            self.machine.seen(silo, self.clock())
            config = self.machine.secure_config
            if key.stage != stage or config is None:
                self.machine.check(silo, key, stage)
                raise ProtocolError("failed_precondition", f"no secure round is running for {key.describe()}")
            try:
                message = build(config.round_id)
            except MessageError as exc:
                raise ProtocolError("invalid_argument", f"{stage_name(stage)}: {exc}") from exc
            # A retried call resends the same request, so its deterministic serialization repeats.
            digest = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
            duplicate = self.machine.accept_secure(silo, key, digest, message)
            self._fault_point(silo, key, duplicate)
            self._cond.notify_all()
        log.info("%s %s from silo %s", "duplicate" if duplicate else "accepted", stage_name(stage), silo)
        return pb.Receipt(ref=ref, duplicate=duplicate)

    def advertise_keys(self, silo: str, request: pb.AdvertiseKeysRequest) -> pb.Receipt:
        """Stage 1: the silo's signed fresh public keys."""
        return self._secure_call(
            silo, request, pb.STAGE_ADVERTISE_KEYS, lambda rid: sw.advert_from_proto(rid, silo, request)
        )

    def share_keys(self, silo: str, request: pb.ShareKeysRequest) -> pb.Receipt:
        """Stage 2: the silo's encrypted shares for its peers."""
        return self._secure_call(
            silo, request, pb.STAGE_SHARE_KEYS, lambda rid: sw.share_keys_from_proto(rid, silo, request.shares)
        )

    def unmask(self, silo: str, request: pb.UnmaskRequest) -> pb.Receipt:
        """Stage 4: the shares that remove the masks of the sum."""
        return self._secure_call(
            silo, request, pb.STAGE_UNMASK, lambda rid: sw.unmask_response_from_proto(rid, silo, request.shares)
        )

    def report_metrics(self, silo: str, request: pb.MetricsReport) -> pb.Receipt:
        """Check and record a silo's evaluation of the current global state, or its statistics."""
        key = stage_key(request.ref)
        stage = Stage.STATISTICS if key.stage == Stage.STATISTICS else Stage.EVALUATE
        digest = hashlib.sha256(request.metrics_json.encode("utf-8")).hexdigest()
        with self._cond:
            self.machine.seen(silo, self.clock())
            if self.machine.admit(silo, key, stage, digest):
                return pb.Receipt(ref=request.ref, duplicate=True)
        assert self.model is not None
        layout = self.model.settings.layout
        try:
            data = json.loads(request.metrics_json)
        except json.JSONDecodeError as exc:
            raise ReportError(f"metrics_json: not valid JSON ({exc})") from exc
        if stage == Stage.STATISTICS:
            return self._report_statistics(silo, key, digest, data, request.ref)
        if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
            raise ReportError("metrics_json: expected an object with 'splits'")
        wanted = self.machine.eval_splits(key.round)
        missing = [s for s in wanted if s not in data["splits"]]
        if missing:
            raise ReportError(f"metrics_json.splits: missing {missing}")
        bounds = {"max_n": self.cfg.max_silo_records, "entries_per_sample": self._entries_per_sample()}
        report = {
            "splits": {
                s: check_split_report(data["splits"][s], len(layout.classes), f"metrics_json.splits.{s}", **bounds)
                for s in wanted
            },
        }
        with self._cond:
            duplicate = self.machine.accept_metrics(silo, key, digest, report)
            self._fault_point(silo, key, duplicate)
            self._cond.notify_all()
        name, first = wanted[0], report["splits"][wanted[0]]
        log.info(
            "%s metrics from silo %s for %s: %s accuracy %.3f on %d samples",
            "duplicate" if duplicate else "accepted",
            silo,
            key.describe(),
            name,
            first["accuracy"],
            first["n"],
        )
        return pb.Receipt(ref=request.ref, duplicate=duplicate)

    def _entries_per_sample(self) -> int:
        """The most hidden entries one evaluated sample can contribute: every channel of every
        window evaluation takes of it (overlapping record windows count an entry more than once)."""
        assert self.model is not None
        settings = self.model.settings
        window = settings.model.length
        windows = len(record_window_starts(settings.layout.length, window, settings.evaluation.window_stride))
        return settings.layout.n_features * window * windows

    def _report_statistics(self, silo: str, key: StageKey, digest: str, data: Any, ref: pb.StageRef) -> pb.Receipt:
        """Check and record a silo's plain statistics report (sums over its training split)."""
        if not isinstance(data, dict) or sorted(data) != ["statistics"]:
            raise ReportError("metrics_json: expected an object with only 'statistics'")
        try:
            report = check_statistics_report(
                data["statistics"], self._statistics_layout(), "metrics_json.statistics",
                max_records=self.cfg.max_silo_records,
            )
        except StatisticsError as exc:
            raise ReportError(str(exc)) from None
        with self._cond:
            duplicate = self.machine.accept_statistics(silo, key, digest, report)
            self._fault_point(silo, key, duplicate)
            self._cond.notify_all()
        log.info("%s statistics from silo %s", "duplicate" if duplicate else "accepted", silo)
        return pb.Receipt(ref=ref, duplicate=duplicate)

    def _statistics_layout(self) -> StatisticsLayout:
        assert self.model is not None
        return StatisticsLayout.of(self.model.settings.layout)

    def _fault_point(self, silo: str, key: StageKey, duplicate: bool) -> None:
        """Die, as a crash would, on accepting the first submission of the injected round and stage.

        Called with the lock held, before the driver can act on the submission: the round is then
        always mid-stage when the process ends, however fast the silos are.
        """
        if not duplicate and self.exit_at is not None and self.exit_at.reached(key.round, key.stage):
            exit_hard(log, f"stopping in {key.describe()} after accepting the submission of silo {silo}")

    def heartbeat(self, silo: str, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        """A sign of life; the reply names the caller and its current task. With ``leaving`` set the
        silo leaves the run for good: it is marked departed at once, so no stage waits for it."""
        reply = pb.HeartbeatReply(silo_id=silo)
        with self._cond:
            now = self.clock()
            self.machine.seen(silo, now)
            if request.leaving:
                self._depart(silo, shown(request.leaving, 500), now)
            elif silo in self.machine.joined():
                reply.current.CopyFrom(stage_ref(self.machine.task_for(silo, now).key))
        if request.status:
            log.debug("silo %s: %s (%.0f%%)", silo, shown(request.status), 100 * request.progress)
        return reply

    def _depart(self, silo: str, reason: str, now: float) -> None:
        """Mark ``silo`` as gone for good (caller holds the lock); logged and written to events.jsonl."""
        self.machine.depart(silo, reason, now)
        self._cond.notify_all()
        log.warning(
            "silo %s leaves the run in round %d: %s",
            silo,
            self.machine.round,
            reason,
            extra={"event": {"event": "silo_departed", "silo": silo, "round": self.machine.round, "reason": reason}},
        )

    # ---- driver -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the driver and any held long polls to finish."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _count(self, effect: Counted) -> list[Any]:
        """Pool the statistics the silos sent before round 0 and fix them for the run."""
        try:
            if effect.total is None:
                pooled = PooledStatistics.pool(list(effect.reports.values()))
            else:
                pooled = PooledStatistics.from_total(
                    self._statistics_layout(),
                    effect.total,
                    len(effect.participants),
                    max_records=self.cfg.max_silo_records,
                )
        except StatisticsError as exc:
            return self._refuse_sum(0, effect.attempt, effect.participants, str(exc))
        with self._cond:
            self.ckpt.statistics = pooled
            self.machine.statistics_recorded(pooled, self.clock())
            self._checkpoint()
            self._cond.notify_all()
        assert self.model is not None
        per_class = dict(zip(self.model.settings.layout.classes, pooled.class_counts, strict=True))
        log.info(
            "data statistics pooled from %d silos (%s): %d training records, per class %s",
            pooled.silos,
            "secure sum" if effect.total is not None else ", ".join(effect.participants),
            sum(pooled.class_counts),
            per_class,
            extra={"event": {"event": "statistics_pooled", "silos": pooled.silos, "class_counts": per_class}},
        )
        return []

    def _aggregate(self, effect: Aggregate) -> list[Any]:
        assert self.model is not None
        t0 = self.clock()
        layout = self.model.secure_layout
        clipped_entries: int | None = None  # known in plain mode only
        if effect.total is not None:
            # Only the sum of the masked vectors was ever unmasked: no individual update exists here,
            # so the sum itself must be one that clipped, capped contributions can give.
            assert self.plan.secure is not None
            try:
                layout.check_total(effect.total, len(effect.updates), 2.0**-self.plan.secure.quant.frac_bits)
            except ValueError as exc:
                return self._refuse_sum(effect.round, effect.attempt, tuple(sorted(effect.updates)), str(exc))
            total = effect.total
        else:
            with self._cond:
                total = self._sums.take(effect.round, effect.attempt, tuple(effect.updates))
            clipped = {silo: u.clipped for silo, u in effect.updates.items() if u.clipped}
            if clipped:
                log.warning("round %d: update entries clipped to +-%g: %s", effect.round, layout.clip_bound, clipped)
            clipped_entries = sum(clipped.values())
        new_state = self.model.next_state(total)
        aggregation_s = self.clock() - t0
        # In secure mode silos download and train in the ADVERTISE_KEYS task.
        train_stage = pb.STAGE_TRAIN if effect.total is None else pb.STAGE_ADVERTISE_KEYS
        name, sha = self.store.save_state(effect.round, new_state, self.model.optimizer.state())
        # The round's sum, journaled: with the initial model the run can be replayed and checked.
        aggregate = self.store.save_aggregate(effect.round, total)
        record = TrainRecord(
            attempt=effect.attempt,
            selected=effect.selected,
            uploads=effect.updates,
            download_bytes=dict(self._downloads.get((effect.round, effect.attempt, train_stage), {})),
            state_bytes=self.model.state_bytes,
            stage_s=effect.stage_s,
            aggregation_s=aggregation_s,
        )
        with self._cond:
            self.model.set_state(new_state)
            self.machine.aggregated(sha, self.clock())
            self.ckpt.state_file, self.ckpt.state_sha256 = name, sha
            self.ckpt.pending_row = train_summary(effect.round, record)
            self.ckpt.pending_row["aggregation"] = "plain" if effect.total is None else "secure"
            self.ckpt.pending_row["aggregate"] = aggregate
            self.ckpt.pending_row["state_sha256"] = sha
            if effect.total is not None:
                names = self.model.group_names
                if "all" in names:
                    # The summed weights are the only sample count the coordinator learns.
                    summed = float(effect.total[names.index("all") - len(names)])
                    self.ckpt.pending_row["samples"] = round(summed * layout.weight_unit)
            if clipped_entries is not None:
                self.ckpt.pending_row["clipped"] = clipped_entries
            self._checkpoint()
            self._cond.notify_all()
        log.info(
            "round %d aggregated from %s (%d samples) in %.3f s",
            effect.round,
            ", ".join(sorted(effect.updates)),
            self.ckpt.pending_row["samples"],
            aggregation_s,
        )
        return []

    def _refuse_sum(self, round_index: int, attempt: int, silos: tuple[str, ...], reason: str) -> list[Any]:
        """What an attempt produced (summed statistics, updates or scores) cannot be used: fail the
        attempt (it is retried, or the run fails), naming who took part."""
        message = f"the sum of {', '.join(silos)} was refused: {reason}"
        log.error(
            "round %d attempt %d: %s",
            round_index,
            attempt,
            message,
            extra={"event": {"event": "sum_refused", "round": round_index, "silos": list(silos)}},
        )
        with self._cond:
            effects = self.machine.refuse_result(message, self.clock())
            self._persist(effects)
            self._cond.notify_all()
        return [e for e in effects if isinstance(e, Failed)]

    def _record(self, effect: Evaluated) -> list[Any]:
        summary = self.ckpt.pending_row or {"round": effect.round}
        stage = pb.STAGE_EVALUATE if effect.total is None else pb.STAGE_ADVERTISE_KEYS
        with self._cond:
            eval_bytes = dict(self._downloads.get((effect.round, effect.attempt, stage), {}))
            layout = self.machine.metrics_layout(effect.round)
        pooled = None
        if effect.total is not None:
            try:
                pooled = decode_metrics(
                    layout, effect.total, len(effect.participants), max_n=self.cfg.max_silo_records
                )
            except MetricsEncodingError as exc:
                return self._refuse_sum(effect.round, effect.attempt, effect.participants, str(exc))
        secure_sum = None if pooled is None else (effect.participants, pooled)
        row = round_row(summary, effect.attempt, effect.stage_s, effect.reports, eval_bytes, secure_sum=secure_sum)
        with self._cond:
            if self.machine.final:
                return self._record_final(row)
            self.ckpt.rows.append(row)
            self.ckpt.pending_row = None
            if self.plan.final_test:
                self._track_best(row)
                if effect.round == self.plan.rounds - 1:
                    self._select_best()
            effects = self.machine.next_round(self.clock())
            self._checkpoint()
            self._downloads = {k: v for k, v in self._downloads.items() if k[0] > effect.round}
            self._cond.notify_all()
        val = row.get("val")
        log.info(
            "round %d of %d done: val accuracy %s from %d silos",
            effect.round + 1,
            self.plan.rounds,
            "n/a" if val is None else f"{val['accuracy']:.3f}",
            len(row["evaluated_by"]),
            extra={"event": {"event": "round_done", "round": effect.round, "val": val}},
        )
        return effects

    def _track_best(self, row: Mapping[str, Any]) -> None:
        """Remember the round whose model has the best pooled validation macro AUROC (lock held)."""
        auroc = (row.get("val") or {}).get("macro_auroc")
        best = self.ckpt.best
        if auroc is None or (best is not None and auroc <= best["macro_auroc"]):
            return
        assert self.ckpt.state_file is not None
        self.ckpt.best = {
            "round": row["round"],
            "macro_auroc": float(auroc),
            "state_file": self.ckpt.state_file,
            "state_sha256": self.ckpt.state_sha256,
        }

    def _select_best(self) -> None:
        """After the last round: serve the best round's model (the last if no round had an AUROC) for
        the final test, and make it the checkpoint's state, so a restart tests and exports it too."""
        best = self.ckpt.best
        if best is not None and best["state_sha256"] != self.ckpt.state_sha256:
            tensors, _ = split_saved_state(self.store.read_state(best["state_file"], best["state_sha256"]))
            assert self.model is not None
            self.model.set_state(tensors)
            self.ckpt.state_file, self.ckpt.state_sha256 = best["state_file"], best["state_sha256"]
        self.machine.select_state(self.ckpt.state_sha256)
        log.info(
            "model selection: round %s's model (validation macro AUROC %s) is tested and exported",
            "the last" if best is None else best["round"] + 1,
            "n/a" if best is None else f"{best['macro_auroc']:.3f}",
            extra={"event": {"event": "model_selected", "round": None if best is None else best["round"]}},
        )

    def _record_final(self, row: dict[str, Any]) -> list[Any]:
        """Record the final test of the selected model and end the run (lock held)."""
        best = self.ckpt.best
        self.ckpt.final = {
            "selected_round": self.plan.rounds - 1 if best is None else best["round"],
            "val_macro_auroc": None if best is None else best["macro_auroc"],
            **row,
        }
        effects = self.machine.next_round(self.clock())
        self._checkpoint()
        self._cond.notify_all()
        test = row.get("test")
        log.info(
            "final test of round %d's model: accuracy %s, macro AUROC %s from %d silos",
            self.ckpt.final["selected_round"] + 1,
            "n/a" if test is None else f"{test['accuracy']:.3f}",
            "n/a" if test is None or test.get("macro_auroc") is None else f"{test['macro_auroc']:.3f}",
            len(row["evaluated_by"]),
            extra={"event": {"event": "final_test", "test": test}},
        )
        return effects

    def _write_status(self, now: float) -> None:
        status = {
            "federation": self.cfg.name,
            "run_id": self.ckpt.run_id,
            "outcome": None if self.outcome is None else self.outcome[0],
            "rounds_recorded": len(self.ckpt.rows),
            **self.machine.status(now),
        }
        key_fields = {k: status[k] for k in ("round", "attempt", "phase", "members", "done", "outcome")}
        line = json.dumps(key_fields, sort_keys=True)
        if line != self._progress_line:
            self._progress_line = line
            members = status["members"]
            log.info(
                "progress: round %d/%d %s attempt %d: %d/%d done%s",
                status["round"] + 1 if status["round"] < status["rounds"] else status["rounds"],
                status["rounds"],
                status["phase"],
                max(status["attempt"], 0),
                len(status["done"]),
                len(members),
                f" (done: {', '.join(status['done']) or 'none'}; of {', '.join(members)})" if members else "",
                extra={"event": {"event": "progress", **key_fields}},
            )
        status.pop("remaining_s", None)
        text = json.dumps(status, sort_keys=True)
        if text != self._status_text:
            self._status_text = text
            atomic_write_bytes(self.run_dir / "status.json", (text + "\n").encode("utf-8"))

    def _persist(self, effects: list[Any]) -> None:
        """Carry out the bookkeeping effects (lock held): checkpoint a new attempt, log a retry."""
        for effect in effects:
            if isinstance(effect, Persist):
                self._checkpoint()
            elif isinstance(effect, Retry):
                log.warning("retrying round %d: %s", effect.round, effect.message)

    def run(self) -> int:
        """Drive the run to its end and write the report; 0 when every round completed, else 1."""
        finished = self.machine.phase == Phase.DONE
        while not finished and not self._stopping.is_set():
            with self._cond:
                now = self.clock()
                before = (self.machine.round, self.machine.attempt, self.machine.phase)
                effects = self.machine.tick(now)
                self._persist(effects)
                if (self.machine.round, self.machine.attempt, self.machine.phase) != before:
                    # Silos holding a GetTask long poll learn their new task now, not when the poll ends.
                    self._cond.notify_all()
                self._write_status(now)
            queue = [e for e in effects if not isinstance(e, Persist | Retry)]
            while queue:
                effect = queue.pop(0)
                if isinstance(effect, Counted):
                    queue.extend(self._count(effect))
                elif isinstance(effect, Aggregate):
                    queue.extend(self._aggregate(effect))
                elif isinstance(effect, Evaluated):
                    queue.extend(self._record(effect))
                elif isinstance(effect, Failed):
                    log.error("run %s failed: %s", self.ckpt.run_id, effect.message)
                    self.outcome = ("failed", effect.message)
                    finished = True
                elif isinstance(effect, Finished):
                    self.outcome = ("complete", f"all {effect.rounds} rounds completed")
                    finished = True
            if not finished:
                with self._cond:
                    self._cond.wait(_DRIVER_PERIOD_S)
        if self._stopping.is_set() and self.outcome is None:
            log.warning("stopped before the run ended; the checkpoint resumes it")
            return 1
        if self.outcome is None:
            self.outcome = (
                "complete",
                f"all {self.plan.rounds} rounds completed (already before this start)",
            )
        path = self._final_report()
        log.info("run %s %s: %s; report %s", self.ckpt.run_id, self.outcome[0], self.outcome[1], path)
        self._tell_silos_done()
        return 0 if self.outcome[0] == "complete" else 1

    def _final_report(self) -> Path:
        assert self.outcome is not None
        model = None
        normalizer = None
        with self._cond:
            self._write_status(self.clock())
            if self.model is not None:
                model = self.model.loaded_model()
                if self.ckpt.statistics is not None:
                    normalizer = self.ckpt.statistics.normalizer
            rows = list(self.ckpt.rows)
            departed = self.machine.departed()
            final = self.ckpt.final
        return write_report(
            self.run_dir,
            federation=self.cfg.name,
            run_id=self.ckpt.run_id,
            status=self.outcome[0],
            message=self.outcome[1],
            rows=rows,
            model=model,
            normalizer=normalizer,
            layout=self.ckpt.layout,
            departed=departed,
            aggregation=self._aggregation_summary(),
            final=final,
        )

    def _aggregation_summary(self) -> dict[str, Any]:
        """How the run combined what silos sent, in words for the report's reader."""
        if self.plan.secure is None:
            return {"mode": "plain", "secure_metrics": False, "note": "the coordinator saw every silo's update"}
        learnt = "updates and evaluation scores" if self.machine.secure_metrics else "updates"
        return {
            "mode": "secure",
            "secure_metrics": self.machine.secure_metrics,
            "note": f"the coordinator learnt only sums of the silos' {learnt}",
        }

    def _tell_silos_done(self) -> None:
        """Keep answering until every connected silo has learnt the run is over, or the grace ends."""
        end = self.clock() + self.cfg.timeouts.done_grace_s
        with self._cond:
            while not self._stopping.is_set():
                now = self.clock()
                waiting = set(self.machine.alive(now)) - set(self.machine.told_done())
                if not waiting or now >= end:
                    break
                self._cond.wait(min(_DRIVER_PERIOD_S, end - now))


def _claims(text: str) -> dict[str, Any]:
    """A silo's statements about its update: information only, never identity or weight."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        log.warning("ignoring claims that are not valid JSON")
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: v
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }

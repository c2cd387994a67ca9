"""The coordinator's state: the round machine, the global model, checkpoints, and the silos' calls.

:class:`Coordinator` holds everything the gRPC handlers touch behind one lock: the
:class:`~coordinator.rounds.RoundMachine`, the global state (and its encoded, chunked form for
downloads), the data layout and the checkpoint. Handlers only record and answer; one driver
thread (:meth:`Coordinator.run`) makes every transition, averages updates outside the lock,
commits checkpoints, writes ``status.json`` for the operator and logs progress (round, stage,
silos done). The submissions live in :mod:`coordinator.uploads` and the driver in
:mod:`coordinator.driver` (both mixed into :class:`Coordinator`); :mod:`coordinator.app` serves it
over mutual TLS; :mod:`coordinator.servicer` is its gRPC face.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from condi_models.data.dataset import DatasetInfo
from condi_models.nn.config import ModelConfig
from condi_models.training import round_lr_scale
from coordinator.config import FederationConfig
from coordinator.driver import RoundDriver
from coordinator.global_model import GlobalModel, RunningSums
from coordinator.layout import layout_mismatch
from coordinator.rounds import (
    ProtocolError,
    RoundMachine,
    RoundPlan,
    RoundProgress,
    SecurePlan,
    TaskView,
)
from coordinator.store import CheckpointStore, CoordinatorCheckpoint, StoreError, split_saved_state
from coordinator.uploads import Submissions
from federation import identity, pki
from federation import secagg_wire as sw
from federation.faults import FaultPoint
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.secagg import KeyRoster, QuantConfig, UnmaskRequest, ca_cert_verifier
from federation.stages import stage_name
from federation.transfer import (
    PROTOCOL_VERSION,
    TransferError,
    info_from_summary,
    stage_key,
    stage_ref,
)
from federation.untrusted import shown

log = logging.getLogger(__name__)

CAPABILITIES = ("plain-aggregation", "secure-aggregation")


def software_version() -> str:
    """The installed condi package version, for the handshake and the logs."""
    try:
        return metadata.version("condi")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_run_id(federation: str) -> str:
    """A fresh run id: the federation name, the UTC start time and a random suffix."""
    return f"{federation}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class Coordinator(Submissions, RoundDriver):
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
